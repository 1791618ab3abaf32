"""End-to-end: the Telco 3-region DP run (ε = 3, 20 rounds), fedcrm vs the hand-written baseline.

Each system runs in its own process (``fedcrm``'s ``run_simulated``; the baseline's ``run.py``), one
after the other, while a thread samples the memory of the whole process tree (driver, Ray daemons,
ClientApp actors) from /proc. Wall time is split with the round times each run logs:

- start-up  = time from launch to the end of round 1, minus one typical round (engine start, Ray
  actors, imports, fedcrm's pre-flight);
- per round = median time between the ends of consecutive rounds (2..R);
- compute   = local training alone: every region's one-round training timed in this process on the
  same rows, divided by the number of clients the engine runs at once (2 on this machine);
- overhead  = per round - compute (messaging, data loading, evaluation, ledger, checkpoints).

    python experiments/bench_end_to_end.py [--rounds 20] [--systems fedcrm,baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "churn_telco_dp.yaml"
PY = sys.executable


def _child_fedcrm(config: Path, rounds: int, out: Path) -> None:
    """Runs inside the measured process: a fedcrm simulation, logging when each round ended."""
    from procmem import simulate_marking_rounds

    from fedcrm.config import load_config
    from fedcrm.experiment import materialise_regions

    cfg = load_config(config).with_overrides({"training.rounds": rounds})
    simulate_marking_rounds(materialise_regions(cfg, data_dir=out / "regions"), out)


def _launch(system: str, *, config: Path, rounds: int, out: Path) -> dict[str, Any]:
    from procmem import TreeSampler

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if system == "fedcrm":
        cmd = [
            PY,
            str(Path(__file__).resolve()),
            "--child",
            "fedcrm",
            "--config",
            str(config),
            "--rounds",
            str(rounds),
            "--out",
            str(out),
        ]
    else:
        cmd = [
            PY,
            str(HERE / "baseline_flower_opacus" / "run.py"),
            str(config),
            "--rounds",
            str(rounds),
            "--out",
            str(out),
        ]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeSampler(proc.pid, interval=0.5) as sampler:
            rc = proc.wait()
    t_end = time.time()
    if rc != 0:
        raise SystemExit(f"{system} run failed (exit {rc}); see {out / 'log.txt'}")
    if system == "fedcrm":
        marks = json.loads((out / "marks.json").read_text())
        ends, auc = marks["round_ends"], marks["auc"]
    else:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        ends, auc = [r["t"] for r in rows], rows[-1]["pooled"]["auc"]
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    per_round = statistics.median(gaps) if gaps else float("nan")
    to_round1 = ends[0] - t0
    return {
        "system": system,
        "wall_s": t_end - t0,
        "to_round1_s": to_round1,
        "per_round_s": per_round,
        "startup_s": to_round1 - per_round,
        "after_last_round_s": t_end - ends[-1],
        "rounds": len(ends),
        "peak_pss_gib": sampler.peak.pss / 2**30,
        "peak_rss_sum_gib": sampler.peak.rss / 2**30,
        "peak_actor_rss_gib": sampler.peak.actor_rss / 2**30,
        "processes": sampler.peak.processes,
        "auc": auc,
    }


def _compute_per_round(config: Path, out: Path, *, parallel: dict[str, int], reps: int = 3) -> dict[str, float]:
    """Seconds of local training per round (all regions / clients at once), per system."""
    import torch

    sys.path.insert(0, str(HERE))
    from baseline_flower_opacus.task import Settings, load_data

    from fedcrm.config import load_config
    from fedcrm.models import build_model
    from fedcrm.privacy.randomness import ReleaseRandomness
    from fedcrm.training import DpSgd, train_locally

    cfg = load_config(config)
    regions = sorted((out / "regions").glob("*.csv"))
    base = Settings(
        region_files=[str(p) for p in regions],
        schema=str(cfg.schema_path),
        hidden=list(cfg.model.hidden) if cfg.model.kind == "mlp" else [],
        rounds=20,
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.learning_rate,
        target_epsilon=cfg.privacy.target_epsilon or 3.0,
        delta=1e-5,
        clipping_norm=cfg.privacy.clipping_norm,
        holdout_fraction=cfg.evaluation.holdout_fraction,
        seed=cfg.seed,
        out_dir=str(out),
    )
    torch.set_num_threads(1)  # what a simulated client with num_cpus = 1 gets

    def fedcrm_round(i: int) -> None:
        ds, _ = load_data(i, base)
        x, y = ds.tensors[0].numpy(), ds.tensors[1].numpy()
        model = build_model(cfg.model, n_features=x.shape[1], seed=0)
        dp = DpSgd(noise_multiplier=1.0, clipping_norm=cfg.privacy.clipping_norm)
        train_locally(model, x=x, y=y, training=cfg.training, dp=dp, randomness=ReleaseRandomness.secure())

    def baseline_round(i: int) -> None:
        from baseline_flower_opacus.task import Net, train
        from opacus import PrivacyEngine

        ds, _ = load_data(i, base)
        model = Net(ds.tensors[0].shape[1], base.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=base.learning_rate)
        loader = torch.utils.data.DataLoader(ds, batch_size=base.batch_size, shuffle=True)
        model, opt, loader = PrivacyEngine(accountant="rdp", secure_mode=False).make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=loader,
            target_epsilon=base.target_epsilon,
            target_delta=base.delta,
            epochs=base.rounds * base.local_epochs,
            max_grad_norm=base.clipping_norm,
        )
        train(model, loader, opt, base.local_epochs)

    out_t: dict[str, float] = {}
    for name, fn in (("fedcrm", fedcrm_round), ("baseline", baseline_round)):
        for i in range(len(regions)):
            fn(i)  # warm-up and data cache
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(len(regions)):
                fn(i)
            times.append(time.perf_counter() - t0)
        out_t[name] = statistics.median(times) / parallel[name]
    return out_t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--systems", default="fedcrm,baseline")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_end_to_end")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "fedcrm":
        _child_fedcrm(args.config, args.rounds, args.out)
        return
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(HERE))
    results = []
    for system in args.systems.split(","):
        print(f"running {system} ({args.rounds} rounds) ...", flush=True)
        results.append(_launch(system, config=args.config.resolve(), rounds=args.rounds, out=args.out / system))
    from fedcrm.fl.simulation import client_processes

    regions = len(list((args.out / results[0]["system"] / "regions").glob("*.csv")))
    # Clients the engine runs at once: fedcrm sizes its process pool; the baseline takes one per core.
    parallel = {"fedcrm": client_processes(regions), "baseline": min(os.cpu_count() or 1, regions)}
    compute = _compute_per_round(args.config.resolve(), args.out / results[0]["system"], parallel=parallel)
    for r in results:
        r["compute_per_round_s"] = compute[r["system"]]
        r["overhead_per_round_s"] = r["per_round_s"] - r["compute_per_round_s"]
        r["client_processes"] = parallel[r["system"]]
        r["pss_per_client_gib"] = r["peak_pss_gib"] / regions
    print(f"\nTelco, 3 regions, {args.rounds} rounds, ε = 3 (load average {os.getloadavg()[0]:.1f})")
    print(
        f"{'system':<9} {'wall s':>7} {'start-up s':>10} {'round s':>8} {'compute s':>9} {'overhead s':>10} "
        f"{'tail s':>7} {'peak PSS':>9} {'PSS/client':>10} {'procs':>5} {'ΣRSS':>7} {'actor RSS':>9} {'AUC':>6}"
    )
    for r in results:
        print(
            f"{r['system']:<9} {r['wall_s']:>7.1f} {r['startup_s']:>10.1f} {r['per_round_s']:>8.2f} "
            f"{r['compute_per_round_s']:>9.3f} {r['overhead_per_round_s']:>10.2f} {r['after_last_round_s']:>7.1f} "
            f"{r['peak_pss_gib']:>8.2f}G {r['pss_per_client_gib']:>9.2f}G {r['client_processes']:>5} "
            f"{r['peak_rss_sum_gib']:>6.2f}G {r['peak_actor_rss_gib']:>8.2f}G "
            f"{r['auc']:>6.3f}"
        )
    if len(results) == 2:
        a, b = results
        print(
            f"{a['system']} / {b['system']}: wall {a['wall_s'] / b['wall_s']:.2f}x, per round "
            f"{a['per_round_s'] / b['per_round_s']:.2f}x, peak PSS (and per simulated client) "
            f"{a['peak_pss_gib'] / b['peak_pss_gib']:.2f}x, "
            f"actor RSS {a['peak_actor_rss_gib'] / b['peak_actor_rss_gib']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
