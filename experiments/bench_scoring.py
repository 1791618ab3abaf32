"""Benchmark: `fedcrm score` throughput at a region, with and without reasons, and its memory.

Writes one region of synthetic customers (`fedcrm data synth`, 1M by default), a served model trained
locally on a sample of them (scoring does not care how the weights were made), tombstones one customer
(so the erasure check runs as it would at a real region), then scores the table through the schema,
chunk by chunk, as `fedcrm score` does: without reasons, and with the top 3 reasons per customer
(on a slice of the table, since reasons cost far more per row). Prints rows/s (per wall and per CPU second)
and the process's peak memory after each step: the peak stays flat as the table grows because the table is streamed.

    .venv/bin/python experiments/bench_scoring.py --customers 1000000 [--model logistic|mlp]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_run(run_dir: Path, *, data: Path, kind: str) -> None:
    """A run folder with a served model trained (without DP) on the table's first 20,000 customers."""
    import itertools

    from fedcrm.config import ModelConfig, TrainingConfig, load_config
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.io import iter_table
    from fedcrm.data.schema import load_schema
    from fedcrm.models import build_model, get_weights
    from fedcrm.privacy.randomness import ReleaseRandomness
    from fedcrm.runs import RunDir
    from fedcrm.training import train_locally

    cfg = load_config(REPO / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"model": ModelConfig(kind=kind, hidden=(64, 64)), "regions": {"eu": data}})
    schema = load_schema(cfg.schema_path)
    sample = next(itertools.islice(iter_table(data, schema, chunk_rows=20_000), 1))
    enc = FeatureEncoder(schema)
    model = build_model(cfg.model, n_features=enc.n_features, seed=0)
    train_locally(
        model,
        x=enc.encode(sample),
        y=sample.labels,
        dp=None,
        randomness=ReleaseRandomness.public_seed(0),
        training=TrainingConfig(local_epochs=2, batch_size=256, learning_rate=0.05),
    )
    RunDir.create(run_dir, cfg).save_model(
        constituents={0: get_weights(model)}, feature_names=enc.feature_names, version=1
    )


def synth_table(out: Path, *, customers: int) -> Path:
    """One region of ``customers`` synthetic customers (``fedcrm data synth --seed 0``), written once."""
    data_dir = out / f"data-{customers}"
    if not (data_dir / "eu.csv").exists():
        t = time.perf_counter()
        # In a child process: generating holds the whole table, which would hide this one's peak memory.
        subprocess.run(
            [sys.executable, "-m", "fedcrm.cli", "data", "synth", "--regions", "eu", "--customers", str(customers)]
            + ["--seed", "0", "--out", str(data_dir)],
            check=True,
            cwd=REPO,
        )
        print(f"wrote {customers} synthetic customers in {time.perf_counter() - t:.1f} s", flush=True)
    return data_dir / "eu.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--reasons-customers", type=int, default=100_000, help="rows scored with reasons")
    ap.add_argument("--model", choices=["logistic", "mlp"], default="logistic")
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scoring")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import pandas as pd

    from fedcrm.scoring import ScoringModel, score_region
    from fedcrm.unlearning.tombstones import Tombstones

    data = synth_table(args.out, customers=args.customers)
    run_dir, state = args.out / f"run-{args.model}", args.out / "state" / "eu"
    make_run(run_dir, data=data, kind=args.model)
    Tombstones(state).add(["eu-0000001"])
    scorer = ScoringModel.load(run_dir)
    # CPU seconds next to wall seconds: on a shared machine the wall clock also counts other processes.
    print("load average (1, 5, 15 min): {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(f"{'what':<38} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'CPU s':>7} {'rows/CPU-s':>10} {'peak MiB':>9}")

    def bench(what: str, table: Path, reasons: int, out: Path) -> None:
        cpu = time.process_time()
        r = score_region(
            region="eu", model=scorer, data=table, state_dir=state, out=out, reasons=reasons, chunk_rows=args.chunk_rows
        )
        n, cpu = r.counts["customers_in_table"], time.process_time() - cpu
        print(
            f"{what:<38} {n:>9} {r.seconds:>8.2f} {n / r.seconds:>9,.0f} {cpu:>7.2f} {n / cpu:>10,.0f} "
            f"{peak_mib():>9.0f}",
            flush=True,
        )

    bench(f"{args.model}, no reasons, CSV out", data, 0, args.out / "scores.csv")
    bench(f"{args.model}, no reasons, Parquet out", data, 0, args.out / "scores.parquet")
    small = args.out / f"first-{args.reasons_customers}.csv"
    if not small.exists():
        pd.read_csv(data, dtype=str, keep_default_na=False, nrows=args.reasons_customers).to_csv(small, index=False)
    bench(f"{args.model}, no reasons (first {args.reasons_customers})", small, 0, args.out / "s-small.csv")
    bench(f"{args.model}, 3 reasons (first {args.reasons_customers})", small, 3, args.out / "s-reasons.csv")
    print("load average (1, 5, 15 min): {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
