"""Local training throughput on Bank, measured side by side in one process.

Three ways to train the same MLP (64, 64) for one local epoch at the same expected batch size:

- ``plain``:  fedcrm's ``train_locally`` without DP (Poisson batches from tensors, plain autograd);
- ``fedcrm``: fedcrm's DP path (``train_locally`` with ``DpSgd``: Poisson batches from tensors +
  Opacus ghost clipping);
- ``opacus``: the straightforward Opacus path a user writes from Flower's Opacus example:
  ``PrivacyEngine().make_private`` with the default ``grad_sample_mode="hooks"`` over a
  ``DataLoader(TensorDataset)`` (per-sample indexing and collation, Poisson sampling).

Each timed call includes what a round pays once (``make_private``, the loader), so samples/s is
"customers of one epoch / seconds of one local round". The variants are interleaved rep by rep so a
busy machine slows them alike; the ratios are what to read, the absolute figures depend on the load.

    python experiments/bench_local_training.py [--reps 3] [--batch-sizes 256,1024] [--threads 1,0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.models import build_model
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import DpSgd, train_locally

REPO = Path(__file__).resolve().parents[1]
BANK = REPO.parent / "shared" / "data" / "bank_marketing_full.csv"
SCHEMA = REPO / "configs" / "schemas" / "bank_propensity.yaml"
MODEL = ModelConfig(kind="mlp", hidden=(64, 64))
SIGMA, CLIP, LR = 1.0, 1.0, 0.01
VARIANTS = ("plain", "fedcrm", "opacus")


def load_bank(rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    schema = load_schema(SCHEMA)
    table = load_table(BANK, schema)
    x = FeatureEncoder(schema).encode(table)
    y = np.asarray(table.labels, dtype=np.float32)
    return (x[:rows], y[:rows]) if rows else (x, y)


def run_fedcrm(x: np.ndarray, y: np.ndarray, *, batch_size: int, dp: bool) -> None:
    model = build_model(MODEL, n_features=x.shape[1], seed=0)
    training = TrainingConfig(local_epochs=1, batch_size=batch_size, optimizer="adam", learning_rate=LR)
    train_locally(
        model,
        x=x,
        y=y,
        training=training,
        dp=DpSgd(noise_multiplier=SIGMA, clipping_norm=CLIP) if dp else None,
        randomness=ReleaseRandomness.secure(),
    )  # what a region draws for every release


def run_opacus_baseline(x: np.ndarray, y: np.ndarray, *, batch_size: int) -> None:
    """What Flower's Opacus example does per round, on this table: engine, loader, hooks."""
    from opacus import PrivacyEngine

    model = build_model(MODEL, n_features=x.shape[1], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
    )
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    for xb, yb in loader:
        if len(xb) == 0:
            continue
        optimizer.zero_grad()
        criterion(model(xb).squeeze(-1), yb).backward()
        optimizer.step()


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(
    x: np.ndarray, y: np.ndarray, *, batch_sizes: list[int], threads: list[int], reps: int
) -> list[dict[str, float]]:
    default_threads = torch.get_num_threads()
    rows = []
    for nt in threads:
        torch.set_num_threads(nt or default_threads)
        for bs in batch_sizes:
            calls: dict[str, Callable[[], None]] = {
                "plain": lambda bs=bs: run_fedcrm(x, y, batch_size=bs, dp=False),
                "fedcrm": lambda bs=bs: run_fedcrm(x, y, batch_size=bs, dp=True),
                "opacus": lambda bs=bs: run_opacus_baseline(x, y, batch_size=bs),
            }
            for fn in calls.values():  # warm-up: imports, allocator, Opacus hooks
                fn()
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(reps):
                for v in VARIANTS:
                    times[v].append(_timed(calls[v]))
            med = {v: statistics.median(t) for v, t in times.items()}
            row = {"threads": float(torch.get_num_threads()), "batch_size": float(bs)}
            row |= {f"{v}_samples_per_s": len(x) / med[v] for v in VARIANTS}
            row["fedcrm_dp_vs_opacus"] = med["opacus"] / med["fedcrm"]
            row["fedcrm_dp_cost_vs_plain"] = med["fedcrm"] / med["plain"]
            rows.append(row)
            print(_line(row), flush=True)
    torch.set_num_threads(default_threads)
    return rows


HEADER = (
    f"{'threads':>7} {'batch':>6} {'plain/s':>10} {'fedcrm DP/s':>12} {'Opacus DP/s':>12} "
    f"{'fedcrm DP ÷ Opacus DP':>22} {'DP cost (× plain)':>18}"
)


def _line(r: dict[str, float]) -> str:
    return (
        f"{int(r['threads']):>7} {int(r['batch_size']):>6} {r['plain_samples_per_s']:>10,.0f} "
        f"{r['fedcrm_samples_per_s']:>12,.0f} {r['opacus_samples_per_s']:>12,.0f} "
        f"{r['fedcrm_dp_vs_opacus']:>21.1f}x {r['fedcrm_dp_cost_vs_plain']:>17.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--threads", default="1,0", help="torch threads to test; 0 = torch's default")
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows of Bank")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if not BANK.exists():
        raise SystemExit(f"{BANK} not found: the Bank Marketing table lives in ../shared/data")
    warnings.filterwarnings("ignore")
    x, y = load_bank(args.rows)
    print(
        f"Local training, one epoch of Bank ({len(x):,} customers, {x.shape[1]} features), MLP (64, 64), "
        f"Adam, σ={SIGMA}, C={CLIP}; median of {args.reps} interleaved reps (setup included)"
    )
    print("goals: fedcrm DP ≥ 6x Opacus DP (hooks + DataLoader); DP cost ≤ 2.5x plain")
    print(HEADER, flush=True)
    rows = measure(
        x,
        y,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        threads=[int(t) for t in args.threads.split(",")],
        reps=args.reps,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
