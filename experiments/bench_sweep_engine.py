"""Seconds per sweep cell: one shared simulation engine for all cells vs a fresh engine per cell.

    .venv/bin/python experiments/bench_sweep_engine.py [--cells 4] [--rounds 2] [--out /tmp/bench-sweep]

Both runs use the same synthetic regions and cells (target ε × seeds); the numbers include engine
start-ups, which is the point: the shared engine pays Ray and actor start-up once per sweep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from fedcrm.data.synthetic import generate
from fedcrm.sweep import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=4, help="federated cells (ε values × 2 seeds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-sweep"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data = args.out / "data"
    generate(regions=["eu", "us", "apac"], customers=[1500, 1000, 800], seed=0, out_dir=data)
    base = args.out / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "task": "churn",
                "schema": str(REPO / "configs/schemas/synthetic_crm.yaml"),
                "regions": {r: str(data / f"{r}.csv") for r in ("eu", "us", "apac")},
                "model": {"kind": "logistic"},
                "training": {"rounds": args.rounds, "batch_size": 128, "learning_rate": 0.05},
                "privacy": {"mode": "sample_dp", "target_epsilon": 2.0, "delta": 1e-5},
                "federation": {"min_regions": 2},
            }
        )
    )
    eps = [0.5 * 2**i for i in range(max(1, args.cells // 2))]
    spec_path = args.out / "sweep.yaml"
    spec_path.write_text(
        yaml.safe_dump({"name": "bench", "base": str(base), "grid": {"privacy.target_epsilon": eps}, "seeds": [0, 1]})
    )
    spec = load_sweep(spec_path)
    results = {}
    for engine in ("shared", "per_cell"):
        t0 = time.time()
        run_sweep(spec, out_dir=args.out / engine, engine=engine, report=lambda s: None)  # type: ignore[arg-type]
        inv = json.loads((args.out / engine / "sweep.json").read_text())["invocations"][-1]
        results[engine] = {
            "cells": inv["federated_cells_run"],
            "seconds": round(time.time() - t0, 1),
            "seconds_per_cell": inv["seconds_per_federated_cell"],
            "engine_starts": inv["engines_started"],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
