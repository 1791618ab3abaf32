"""Scale: many synthetic tenants (regions) × rounds, wall time per round and memory of all processes.

Each cell (tenants × customers per tenant) runs fedcrm's simulation of ``configs/demo.yaml`` (MLP
(32, 32), ε = 3, batch 256) in its own process over tenants made by ``fedcrm data synth``; a thread
samples the PSS and RSS of the whole process tree (driver, Ray daemons, ClientApp actors) every 0.5 s.
"Flat memory" is read from the tree's PSS at the end of round 2 and at the end of the last round. A cell
``TENANTSxCUSTOMERS@F`` trains a random fraction F of the tenants each round (``federation.fraction_train``)
and reports the spread of the tenants' ε at the end; "ms/t-r" is the median round's time per tenant
trained in it.

    python experiments/bench_scale.py [--cells 10x1000,100x1000,1000x1000@0.1] [--rounds 10]
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
CONFIG = REPO / "configs" / "demo.yaml"


def _data(root: Path, tenants: int, customers: int) -> Path:
    """Synthetic tenants, made once and reused (same arguments give the same files)."""
    from fedcrm.data.synthetic import generate

    d = root / f"data-{tenants}x{customers}"
    if not (d / "manifest.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        generate(regions=tenants, customers=customers, seed=0, out_dir=d)
    return d


def _child(data: Path, rounds: int, out: Path, fraction: float) -> None:
    """Runs inside the measured process: one fedcrm simulation, logging when each round ended."""
    from procmem import simulate_marking_rounds

    from fedcrm.config import load_config

    regions = {p.stem: p.resolve() for p in sorted(data.glob("*.csv"))}
    cfg = load_config(CONFIG).with_overrides({"training.rounds": rounds, "federation.fraction_train": fraction})
    simulate_marking_rounds(cfg.model_copy(update={"regions": regions, "name": f"scale-{len(regions)}"}), out)


def run_cell(
    tenants: int, customers: int, *, rounds: int, root: Path, timeout: float, fraction: float = 1.0
) -> dict[str, Any]:
    from procmem import TreeSampler

    data = _data(root, tenants, customers)
    out = root / f"run-{tenants}x{customers}@{fraction:g}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [
        PY,
        str(Path(__file__).resolve()),
        "--child",
        str(data),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
        "--fraction",
        str(fraction),
    ]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeSampler(proc.pid, interval=0.5) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                rc = proc.wait()
                rc = rc or -1
    wall = time.time() - t0
    row: dict[str, Any] = {
        "tenants": tenants,
        "customers": customers,
        "rounds": rounds,
        "wall_s": wall,
        "fraction": fraction,
        "ok": rc == 0,
        "peak_pss_gib": sampler.peak.pss / 2**30,
        "peak_rss_gib": sampler.peak.rss / 2**30,
        "processes": sampler.peak.processes,
        "actor_rss_gib": sampler.peak.actor_rss / 2**30,
    }
    marks = out / "marks.json"
    if rc == 0 and marks.exists():
        mark = json.loads(marks.read_text())
        ends = mark["round_ends"]
        gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        eps = sorted(mark.get("epsilon", {}).values())
        trained = max(1, int(tenants * fraction))  # Flower's draw: int(tenants × fraction) per round
        row |= {
            "ms_per_tenant_round": 1000 * statistics.median(gaps) / trained if gaps else float("nan"),
            "epsilon_min": eps[0] if eps else float("nan"),
            "epsilon_median": statistics.median(eps) if eps else float("nan"),
            "epsilon_max": eps[-1] if eps else float("nan"),
            "to_round1_s": ends[0] - t0,
            "per_round_s": statistics.median(gaps) if gaps else float("nan"),
            "first_gap_s": gaps[0] if gaps else float("nan"),
            "last_gap_s": gaps[-1] if gaps else float("nan"),
            "pss_round2_gib": _pss_at(sampler.peak.samples, ends[1] if len(ends) > 1 else ends[0]) / 2**30,
            "pss_last_gib": _pss_at(sampler.peak.samples, ends[-1]) / 2**30,
        }
        row |= _training_spread(out / "state")
    return row


def _training_spread(state_root: Path) -> dict[str, Any]:
    """Rounds each tenant trained and its training customers' ε (from the ledgers; the run's ε above is
    the worst customer's, which the hold-out evaluation at the end sets when a tenant trained little)."""
    from fedcrm.privacy.ledger import POPULATION_TRAIN, PrivacyLedger

    rounds, eps = [], []
    for d in sorted(p for p in state_root.iterdir() if p.is_dir()):
        ledger = PrivacyLedger.open(d, region=d.name)
        trained = [e for e in ledger.events() if (e.population or POPULATION_TRAIN).startswith(POPULATION_TRAIN)]
        rounds.append(len(trained))
        eps.append(ledger.epsilon_of_shard(shard=0, shards=1, delta=1e-6, accountant="rdp") if trained else 0.0)
    spread = {}
    for name, values in (("rounds_trained", rounds), ("train_epsilon", eps)):
        values.sort()
        spread[name] = (values[0], statistics.median(values), values[-1]) if values else (0, 0, 0)
    return spread


def _pss_at(samples: list[tuple[float, int]], t: float) -> int:
    before = [p for ts, p in samples if ts <= t]
    return before[-1] if before else 0


PY = sys.executable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="10x1000,50x1000,100x1000,200x1000", help="TENANTSxCUSTOMERS,...")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scale")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a cell is stopped")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        _child(args.child, args.rounds, args.out, args.fraction)
        return
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(HERE))
    print(
        f"Scale: synthetic tenants × {args.rounds} rounds, demo model, ε = 3 (load average "
        f"{os.getloadavg()[0]:.1f}); goal 1,000 × 1k in < 300 s, memory flat and < 8 GiB"
    )
    print(
        f"{'tenants':>7} {'cust':>7} {'frac':>5} {'wall s':>7} {'to r1 s':>8} {'round s':>8} {'ms/t-r':>6} "
        f"{'r2→3 s':>7} {'last s':>7} {'PSS peak':>9} {'RSS peak':>9} {'PSS r2':>7} {'PSS end':>8} {'actor':>6} "
        f"{'procs':>5} {'ε min/median/max':>17} {'rounds trained':>14} {'training ε':>17}",
        flush=True,
    )
    rows = []
    for cell in args.cells.split(","):
        size, _, frac = cell.partition("@")
        tenants, customers = (int(v) for v in size.lower().split("x"))
        fraction = float(frac or 1.0)
        r = run_cell(tenants, customers, rounds=args.rounds, root=args.out, timeout=args.timeout, fraction=fraction)
        rows.append(r)
        if not r["ok"]:
            print(
                f"{tenants:>7} {customers:>7} {fraction:>5g} {r['wall_s']:>7.1f}  FAILED or timed out "
                f"(see {args.out}/run-{tenants}x{customers}@{fraction:g}/log.txt)",
                flush=True,
            )
            continue
        print(
            f"{tenants:>7} {customers:>7} {fraction:>5g} {r['wall_s']:>7.1f} {r['to_round1_s']:>8.1f} "
            f"{r['per_round_s']:>8.2f} {r['ms_per_tenant_round']:>6.1f} {r['first_gap_s']:>7.2f} "
            f"{r['last_gap_s']:>7.2f} {r['peak_pss_gib']:>8.2f}G {r['peak_rss_gib']:>8.2f}G "
            f"{r['pss_round2_gib']:>6.2f}G {r['pss_last_gib']:>7.2f}G {r['actor_rss_gib']:>5.2f}G "
            f"{r['processes']:>5} {r['epsilon_min']:>5.2f}/{r['epsilon_median']:.2f}/{r['epsilon_max']:.2f} "
            f"{'/'.join(f'{v:g}' for v in r['rounds_trained']):>14} "
            f"{'/'.join(f'{v:.2f}' for v in r['train_epsilon']):>17}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
