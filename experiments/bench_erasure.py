"""Benchmark: how long an erasure takes to serve, by number of SISA shards, and what sharding costs in AUC.

For each dataset (Telco churn, Bank propensity: the shipped configs, split into regions by id hash) and
each S in --shards: train the served model from scratch (= the time of a full retrain at that S), then
forget one training customer of the first region and retrain the stale constituent (the time from
request to updated model). All S train to the same target ε per shard, so per customer the same ε
(parallel composition). Prints a table and writes JSON next to --out.

    .venv/bin/python experiments/bench_erasure.py --rounds 5 --shards 1,4,8 --out runs/bench_erasure

Times are wall-clock seconds in Flower's simulation on this machine, the engine start included
(``train_s``, ``erasure_s``); ``*_fed_s`` is the time inside the federation (summary ``wall_time_s``),
without the simulation engine's start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"telco": REPO / "configs" / "churn_telco_dp.yaml", "bank": REPO / "configs" / "propensity_bank_dp.yaml"}


def bench_one(config: Path, *, shards: int, rounds: int | None, work: Path, data_dir: Path) -> dict[str, Any]:
    from fedcrm.commands.unlearning import forget_customers, retrain_run
    from fedcrm.config import load_config
    from fedcrm.experiment import materialise_regions
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.unlearning.retrain import run_view

    cfg = load_config(config)
    overrides: dict[str, Any] = {"unlearning.shards": shards}
    if rounds:
        overrides["training.rounds"] = rounds
    cfg = cfg.with_overrides(overrides)
    if not data_dir.exists():
        materialise_regions(cfg, data_dir=data_dir)
    cfg = cfg.model_copy(update={"regions": {r: (data_dir / f"{r}.csv").resolve() for r in cfg.regions}})
    run_dir, state = work / "run", work / "state"
    quiet = lambda s: None  # noqa: E731

    t0 = time.perf_counter()
    summary = run_simulated(cfg, run_dir=run_dir, state_root=state, report=quiet)
    train_s = time.perf_counter() - t0

    region = sorted(cfg.regions)[0]
    view = run_view(run_dir, region=region, state_root=state)
    victim = next(iter(view.trained))
    t1 = time.perf_counter()
    forget_customers(region=region, customer_ids=[victim], state_root=state, runs=[run_dir])
    result = retrain_run(run_dir, state_root=state, report=quiet)
    erasure_s = time.perf_counter() - t1
    after = result.summary or {}
    return {
        "shards": shards,
        "rounds": cfg.training.rounds,
        "train_s": round(train_s, 1),
        "train_fed_s": summary.get("wall_time_s"),
        "erasure_s": round(erasure_s, 1),
        "erasure_fed_s": after.get("wall_time_s"),
        "retrained_shards": result.stale,
        "auc": summary["final_metrics"].get("auc"),
        "auc_after_erasure": after.get("final_metrics", {}).get("auc"),
        "epsilon": max((p.get("epsilon") or 0.0) for p in summary["privacy"].values()),
        "charge": (result.receipts[0].get("privacy") or {}).get("charge") if result.receipts else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="telco,bank")
    ap.add_argument("--shards", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=None, help="override training.rounds (default: the config's)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_erasure")
    args = ap.parse_args()
    shared = REPO.parent / "shared" / "data"
    if not shared.exists():
        sys.exit(f"the public tables are not at {shared}: nothing to benchmark")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        for s in (int(x) for x in args.shards.split(",")):
            work = args.out / f"{name}-s{s}"
            shutil.rmtree(work, ignore_errors=True)
            row = {"dataset": name, **bench_one(DATASETS[name], shards=s, rounds=args.rounds, work=work,
                                                 data_dir=args.out / f"{name}-regions")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    full = {r["dataset"]: r["train_s"] for r in rows if r["shards"] == 1}
    full_fed = {r["dataset"]: r["train_fed_s"] for r in rows if r["shards"] == 1}
    print("| dataset | S | rounds | full train (s) | erasure: request -> new model (s) | speed-up vs full "
          "retrain S=1 | same, federation time only | pooled AUC | AUC after erasure | ε per customer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = full.get(r["dataset"], float("nan")) / r["erasure_s"]
        spf = (full_fed.get(r["dataset"]) or float("nan")) / (r["erasure_fed_s"] or float("nan"))
        print(f"| {r['dataset']} | {r['shards']} | {r['rounds']} | {r['train_s']:.1f} | {r['erasure_s']:.1f} | "
              f"{sp:.2f}x | {spf:.2f}x | {r['auc']:.4f} | {r['auc_after_erasure']:.4f} | {r['epsilon']:.2f} |")


if __name__ == "__main__":
    main()
