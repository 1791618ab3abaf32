"""Benchmark: a federation that stays up (``fedcrm deploy up`` + ``run --federation``) against a cold
``fedcrm deploy local``, on the real deployment engine (TLS SuperLink, one SuperNode per region, loopback).

Figures, all wall-clock seconds from the moment the command's work starts (the CLI's own import excluded):

- ``first round``: until the run's log shows round 1 ended. Cold: certificates loaded, SuperLink and
  SuperNodes started, keys registered, the run submitted. Warm: only the submission (bundle signed,
  ``flwr run``) on a federation that was already up.
- ``run``: until the run's result is written (every round, the served model's evaluation).
- erasure retrain: one customer of eu forgotten in a run of ``--shards`` constituents, then the time
  from the retrain's start to the new model served, today (``fedcrm retrain``, in simulation, its engine
  started for it) against ``fedcrm retrain --federation`` on the warm federation.

Telco churn (3 regions, hash split, ε = 3), ``--rounds`` rounds (the first round is what differs; the
rest cost the same on both). Prints a table and the machine's load average, which moves every figure.

    .venv/bin/python experiments/bench_federation.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROUND_1 = re.compile(r"^round\s+1/\d+")


def telco_config(out: Path, *, rounds: int, shards: int, shared: Path | None) -> Path:
    """The shipped Telco config, its split made once into ``out/data`` and named file by file (so that
    ``fedcrm forget --run`` finds each region's table), with ``rounds`` and ``shards``."""
    from fedcrm.config import dump_yaml, load_config
    from fedcrm.experiment import materialise_regions

    cfg = load_config(REPO / "configs" / "churn_telco_dp.yaml")
    if shared is not None and cfg.split is not None:
        cfg = cfg.with_overrides({"split.input": str(shared / Path(cfg.split.input).name)})
    if cfg.split is not None and not Path(cfg.split.input).exists():
        raise SystemExit(f"{cfg.split.input}: the Telco table is missing; pass --shared DIR (the folder holding it)")
    cfg = materialise_regions(cfg, data_dir=out / "data")
    cfg = cfg.model_copy(update={"split": None, "output_dir": out / "runs"})
    cfg = cfg.with_overrides({"training.rounds": rounds, "unlearning.shards": shards})
    path = out / f"telco-s{shards}.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    return path


def trained_customer(run_dir: Path, *, state_root: Path, region: str) -> str:
    """One customer of ``region`` that the run trained on (not in the hold-out)."""
    from fedcrm.unlearning.retrain import run_view

    return next(iter(run_view(run_dir, region=region, state_root=state_root).trained))


def erasure_retrain_s(run_dir: Path, *, state_root: Path, federation: Path | None) -> float:
    """Forget one of eu's trained customers, then time the retrain that serves it (one constituent)."""
    from fedcrm.commands.unlearning import forget_customers, retrain_run

    customer = trained_customer(run_dir, state_root=state_root, region="eu")
    forget_customers(region="eu", customer_ids=[customer], state_root=state_root, runs=[run_dir])
    t0 = time.perf_counter()
    result = retrain_run(
        run_dir,
        state_root=state_root,
        report=lambda _: None,
        federation=None if federation is None else str(federation),
    )
    if len(result.stale) != 1:
        raise SystemExit(f"expected one stale constituent, got {result.stale}")
    return time.perf_counter() - t0


class Clock:
    """A report callback that notes when round 1 ended, relative to ``start``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_round: float | None = None

    def __call__(self, line: str) -> None:
        if self.first_round is None and ROUND_1.match(line.strip()):
            self.first_round = time.perf_counter() - self.start


def timed(work: Callable[[Clock], Any]) -> tuple[float, float]:
    clock = Clock()
    result = work(clock)
    if not getattr(result, "completed", True):
        raise SystemExit(f"the run did not complete: {result.status}")
    total = time.perf_counter() - clock.start
    if clock.first_round is None:
        raise SystemExit("no `round 1/N` line was streamed")
    return clock.first_round, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm-runs", type=int, default=2, help="runs submitted to the federation once it is up")
    ap.add_argument("--shards", type=int, default=2, help="constituents of the erasure runs (one is retrained)")
    ap.add_argument("--no-retrain", action="store_true", help="skip the erasure retrains")
    ap.add_argument("--only-retrain", action="store_true", help="only the erasure retrains (no run timings)")
    ap.add_argument("--shared", type=Path, default=None, help="folder holding telco_customer_churn.csv")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args()
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

    from fedcrm.deploy.federation import down, run_on, up
    from fedcrm.deploy.local import deploy_local
    from fedcrm.fl.simulation import run_simulated

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-federation-"))
    work.mkdir(parents=True, exist_ok=True)
    config = telco_config(work, rounds=args.rounds, shards=1, shared=args.shared)
    sharded = telco_config(work, rounds=args.rounds, shards=args.shards, shared=args.shared)
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, float, float]] = []
    if not args.only_retrain:
        rows.append(
            (
                "cold: deploy local",
                *timed(
                    lambda c: deploy_local(
                        config,
                        workdir=work / "cold",
                        state_root=work / "state-cold",
                        run_dir=work / "run-cold",
                        report=c,
                    )
                ),
            )
        )
    retrains: list[tuple[str, float]] = []
    if not args.no_retrain:  # today's retrain: in simulation, the engine started for it
        from fedcrm.config import load_config

        run_simulated(
            load_config(sharded), run_dir=work / "run-sim", state_root=work / "state-sim", report=lambda _: None
        )
        retrains.append(
            ("simulation (today)", erasure_retrain_s(work / "run-sim", state_root=work / "state-sim", federation=None))
        )
    folder = work / "warm"
    t0 = time.perf_counter()
    up(config, folder=folder, name="bench", state_root=work / "state-warm", report=lambda _: None)
    up_s = time.perf_counter() - t0
    try:
        for i in range(0 if args.only_retrain else args.warm_runs):
            run_dir = work / f"run-warm-{i}"
            rows.append(
                (
                    f"warm: run --federation #{i + 1}",
                    *timed(lambda c, run_dir=run_dir: run_on(folder, config, run_dir=run_dir, report=c)),
                )
            )
        if not args.no_retrain:
            run_on(folder, sharded, run_dir=work / "run-warm-sharded", report=lambda _: None)
            retrains.append(
                (
                    "warm federation",
                    erasure_retrain_s(work / "run-warm-sharded", state_root=work / "state-warm", federation=folder),
                )
            )
    finally:
        down(folder, report=lambda _: None)
    load_after = os.getloadavg()[0]

    print(
        f"\nTelco, 3 regions, {args.rounds} rounds, ε = 3, real deployment on loopback (load average "
        f"{load_before:.1f} before, {load_after:.1f} after; `deploy up` itself took {up_s:.1f} s)"
    )
    if len(rows) > 1:
        print(f"{'':<28} {'to round 1 end (s)':>19} {'whole run (s)':>14}")
        for name, first, total in rows:
            print(f"{name:<28} {first:>19.1f} {total:>14.1f}")
        cold = rows[0][1]
        warm = min(r[1] for r in rows[1:])
        print(f"first round: warm {warm:.1f} s vs cold {cold:.1f} s ({cold / warm:.1f}x); goal < 4 s")
    if retrains:
        print(
            f"\nerasure of one eu customer, S = {args.shards}: retrain of its constituent "
            f"(request -> new model served), {args.rounds} rounds"
        )
        for name, seconds in retrains:
            print(f"  {name:<24} {seconds:>7.1f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
