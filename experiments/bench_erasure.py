"""Benchmark: how long an erasure takes to serve, by number of SISA shards, and what sharding costs in AUC.

For each dataset (Telco churn, Bank propensity: the shipped configs, split into regions by id hash) and
each S in --shards: train the served model from scratch (= the time of a full retrain at that S), then
forget one training customer of the first region: with S > 1 the served model drops the stale
constituent at once (``exclusion_s``: request -> served model without the customer; pooled hold-out AUC
of the served model with all S constituents and with that one excluded), then retrain the stale
constituent (``erasure_s``: request -> retrained model served). All S train to the same target ε per
shard, so per customer the same ε (parallel composition). Prints a table and writes JSON next to --out.

    .venv/bin/python experiments/bench_erasure.py --rounds 5 --shards 1,4,8 --out runs/bench_erasure
    .venv/bin/python experiments/bench_erasure.py --datasets synthetic --customers 100000 --epochs 5 \
        --rounds 10 --shards 1,8      # where local training, not overhead, is most of a round

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


def dataset_config(name: str, *, data_dir: Path, customers: int, shared: Path | None = None) -> Any:
    """The dataset's config with its regions made in ``data_dir`` (once): a split of a shipped table, or
    ``synthetic``: 4 regions of ``customers`` each from ``fedcrm data synth``, with the demo config."""
    from fedcrm.config import load_config
    from fedcrm.data.synthetic import generate
    from fedcrm.experiment import materialise_regions

    if name == "synthetic":
        regions = ["r1", "r2", "r3", "r4"]
        if not (data_dir / "manifest.json").exists():
            generate(regions=regions, customers=[customers] * 4, seed=0, out_dir=data_dir)
        cfg = load_config(REPO / "configs" / "demo.yaml")
        return cfg.model_copy(update={"regions": {r: (data_dir / f"{r}.csv").resolve() for r in regions}})
    cfg = load_config(DATASETS[name])
    if shared is not None and cfg.split is not None:  # the public tables elsewhere than ../shared/data
        cfg = cfg.with_overrides({"split.input": str(shared / Path(cfg.split.input).name)})
    if not data_dir.exists():
        materialise_regions(cfg, data_dir=data_dir)
    return cfg.model_copy(update={"regions": {r: (data_dir / f"{r}.csv").resolve() for r in cfg.regions}})


def pooled_auc(cfg: Any, run_dir: Path, state: Path) -> float:
    """AUC of the run's *served* model (model/model.json now) on every region's hold-out, pooled."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from fedcrm.data.schema import load_schema
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.node_settings import region_settings
    from fedcrm.region import Region

    served, schema = ServedModel.load(run_dir), load_schema(cfg.schema_path)
    ys, ps = [], []
    for region in sorted(cfg.regions):
        data = Region(region_settings(cfg, state_root=state)[region]).load(cfg, schema)
        ys.append(data.y[data.holdout])
        ps.append(served.proba(data.x[data.holdout]))
    return float(roc_auc_score(np.concatenate(ys), np.concatenate(ps)))


def bench_one(cfg: Any, *, shards: int, rounds: int | None, epochs: int | None, work: Path) -> dict[str, Any]:
    from fedcrm.commands.unlearning import forget_customers, retrain_run
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.unlearning.retrain import run_view

    overrides: dict[str, Any] = {"unlearning.shards": shards}
    if rounds:
        overrides["training.rounds"] = rounds
    if epochs:
        overrides["training.local_epochs"] = epochs
    cfg = cfg.with_overrides(overrides)
    run_dir, state = work / "run", work / "state"
    quiet = lambda s: None  # noqa: E731

    t0 = time.perf_counter()
    summary = run_simulated(cfg, run_dir=run_dir, state_root=state, report=quiet)
    train_s = time.perf_counter() - t0

    region = sorted(cfg.regions)[0]
    view = run_view(run_dir, region=region, state_root=state)
    victim = next(iter(view.trained))
    auc_all = pooled_auc(cfg, run_dir, state)
    t1 = time.perf_counter()
    forget_customers(region=region, customer_ids=[victim], state_root=state, runs=[run_dir])
    exclusion_s = time.perf_counter() - t1  # request -> served model without the customer (S > 1)
    auc_excluded = pooled_auc(cfg, run_dir, state) if shards > 1 else None
    result = retrain_run(run_dir, state_root=state, report=quiet)
    erasure_s = time.perf_counter() - t1
    after = result.summary
    return {
        "shards": shards,
        "rounds": cfg.training.rounds,
        "epochs": cfg.training.local_epochs,
        "train_s": round(train_s, 1),
        "train_fed_s": summary.wall_time_s,
        "exclusion_s": round(exclusion_s, 3) if shards > 1 else None,
        "erasure_s": round(erasure_s, 1),
        "served_auc_all": auc_all,
        "served_auc_one_excluded": auc_excluded,
        "erasure_fed_s": after.wall_time_s if after else None,
        "retrained_shards": result.stale,
        "auc": summary.final_metrics.get("auc"),
        "auc_after_erasure": after.final_metrics.get("auc") if after else None,
        "epsilon": max((p.get("epsilon") or 0.0) for p in summary.privacy.values()),
        "charge": result.receipts[-1]["runs"][0]["privacy"]["charge"] if result.receipts else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="telco,bank")
    ap.add_argument("--shards", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=None, help="override training.rounds (default: the config's)")
    ap.add_argument("--epochs", type=int, default=None, help="override training.local_epochs")
    ap.add_argument("--customers", type=int, default=100_000, help="customers per region of `synthetic`")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_erasure")
    ap.add_argument("--shared", type=Path, default=None, help="folder of the public tables (default ../shared/data)")
    args = ap.parse_args()
    shared = args.shared or REPO.parent / "shared" / "data"
    if not shared.exists() and set(args.datasets.split(",")) - {"synthetic"}:
        sys.exit(f"the public tables are not at {shared}: use --datasets synthetic")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        for s in (int(x) for x in args.shards.split(",")):
            work = args.out / f"{name}-s{s}"
            shutil.rmtree(work, ignore_errors=True)
            cfg = dataset_config(
                name, data_dir=args.out / f"{name}-regions", customers=args.customers, shared=args.shared
            )
            row = {"dataset": name, **bench_one(cfg, shards=s, rounds=args.rounds, epochs=args.epochs, work=work)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    full = {r["dataset"]: r["train_s"] for r in rows if r["shards"] == 1}
    print(
        "| dataset | S | rounds × epochs | full train (s) | request -> served by exclusion (s) | request -> "
        "retrained (s) | speed-up vs full retrain S=1 | served AUC, all S | served AUC, one excluded | "
        "AUC after retrain | ε per customer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = full.get(r["dataset"], float("nan")) / r["erasure_s"]
        excl = "-" if r["exclusion_s"] is None else f"{r['exclusion_s']:.2f}"
        one = "-" if r["served_auc_one_excluded"] is None else f"{r['served_auc_one_excluded']:.4f}"
        print(
            f"| {r['dataset']} | {r['shards']} | {r['rounds']} × {r['epochs']} | {r['train_s']:.1f} | {excl} | "
            f"{r['erasure_s']:.1f} | {sp:.2f}x | {r['served_auc_all']:.4f} | {one} | "
            f"{r['auc_after_erasure']:.4f} | {r['epsilon']:.2f} |"
        )


if __name__ == "__main__":
    main()
