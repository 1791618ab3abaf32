"""Run the hand-written Flower + Opacus baseline on a fedcrm experiment config, in simulation.

    python experiments/baseline_flower_opacus/run.py configs/churn_telco_dp.yaml --rounds 20 --out runs/baseline

It reuses fedcrm's split (``materialise_regions``) so the regions hold the same customers, and the
config's model, rounds, local epochs, batch size, learning rate, ε, δ and clipping norm. The
Simulation Engine gets the same backend settings as fedcrm's (one CPU per simulated client), so the
comparison is about what runs inside the clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/baseline_flower_opacus"))
    args = p.parse_args()

    # The Ray workers inherit the environment: they find the apps' package and the run's settings there.
    sys.path.insert(0, str(EXPERIMENTS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXPERIMENTS), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ["FLWR_HOME"] = str((args.out / ".flwr").resolve())

    from fedcrm.config import load_config
    from fedcrm.experiment import materialise_regions

    cfg = load_config(args.config)
    if args.rounds:
        cfg = cfg.with_overrides({"training.rounds": args.rounds})
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    cfg = materialise_regions(cfg, data_dir=out / "regions")
    settings = {
        "region_files": [str(Path(f).resolve()) for f in cfg.regions.values()],
        "schema": str(cfg.schema_path.resolve()),
        "hidden": list(cfg.model.hidden) if cfg.model.kind == "mlp" else [],
        "rounds": cfg.training.rounds,
        "local_epochs": cfg.training.local_epochs,
        "batch_size": cfg.training.batch_size,
        "learning_rate": cfg.training.learning_rate,
        "target_epsilon": cfg.privacy.target_epsilon,
        "delta": cfg.privacy.delta or 1e-5,
        "clipping_norm": cfg.privacy.clipping_norm,
        "holdout_fraction": cfg.evaluation.holdout_fraction,
        "seed": cfg.seed,
        "out_dir": str(out),
    }
    os.environ["BASELINE_SETTINGS"] = json.dumps(settings)

    from flwr.simulation import run_simulation

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from baseline_flower_opacus.client_app import app as client_app
    from baseline_flower_opacus.server_app import app as server_app

    t0 = time.time()
    n = len(settings["region_files"])
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(1, min(os.cpu_count() or 1, n)),
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            },
        },
    )
    import ray

    if ray.is_initialized():
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["pooled"] if rows else {}
    print(
        f"baseline: {len(rows)} rounds in {time.time() - t0:.1f}s; last round pooled AUC "
        f"{last.get('auc', float('nan')):.4f} (mean of regional AUCs weighted by examples)"
    )


if __name__ == "__main__":
    main()
