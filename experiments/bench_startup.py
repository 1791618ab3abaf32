"""Benchmark: the wall time of each data owner's command, the whole process, as the person typing it waits.

Builds one region's state on a synthetic table of --customers (a finished run's folder with a served
model, a ledger of ten rounds of releases, then whatever each command leaves), and runs every command
of the data owner's day through the CLI in a fresh interpreter, twice: ``first`` is the first time
(the page cache holds whatever the previous commands left), ``again`` the same command right after.
Beside them, two anchors: ``flwr --version`` (Flower's own start) and ``python -c "import torch"``
(what a command pays once it touches torch). Prints a table with the load average before and after:
on a shared machine the wall clock also counts the other processes.

    .venv/bin/python experiments/bench_startup.py --customers 3000 --out runs/bench_startup

tests/core/test_import_budget.py builds its region with :func:`region_state` and runs
:func:`data_owner_commands` to check what each command imports.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
REGION = "eu"
ROUNDS = 10


@dataclass(frozen=True)
class RegionFiles:
    """What a data owner's commands name: the region's table, schema, state root, a run and a scratch folder."""

    data: Path
    schema: Path
    state: Path
    run: Path
    scratch: Path
    customers: tuple[str, ...]  # ids that consented to churn, in table order: one per command that needs one


def region_state(out: Path, *, customers: int) -> RegionFiles:
    """One region ``eu`` of ``customers`` synthetic customers, a finished run trained on it and a ledger
    holding that run's releases: the state a data owner's commands read."""
    from fedcrm.config import load_config
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.schema import load_schema
    from fedcrm.data.synthetic import generate
    from fedcrm.models import build_model, get_weights
    from fedcrm.privacy.accountant import GaussianRelease
    from fedcrm.privacy.ledger import PrivacyLedger
    from fedcrm.privacy.ledger_store import OUTCOME_SENT
    from fedcrm.runs import RunDir
    from fedcrm.state.secret import region_secret

    data_dir, state, run = out / "data", out / "state", out / "run"
    generate(regions=[REGION], customers=[customers], seed=0, out_dir=data_dir)
    data = data_dir / f"{REGION}.csv"
    # A served model of random weights: what the commands time is reading it, not what it learnt.
    cfg = load_config(REPO / "configs" / "demo.yaml").with_overrides(
        {"regions": {REGION: str(data)}, "federation.min_regions": 1, "model.kind": "logistic"}
    )
    names = FeatureEncoder(load_schema(cfg.schema_path)).feature_names
    model = build_model(cfg.model, n_features=len(names), seed=0)
    RunDir.create(run, cfg).save_model(constituents={0: get_weights(model)}, feature_names=names, version=1)
    region_secret(state / REGION)
    ledger = PrivacyLedger.open(state / REGION, region=REGION)
    for rnd in range(1, ROUNDS + 1):
        event = ledger.record_release(
            shard=0,
            purpose="churn",
            run_id="bench-0001",
            round=rnd,
            release=GaussianRelease(1.1, 64 / customers, customers // 64),
            delta=1e-5,
            population="train:0.2",
        )
        ledger.mark_outcome(event, OUTCOME_SENT)
    with data.open(newline="") as f:
        consented = tuple(row["customer_id"] for row in csv.DictReader(f) if row["consent_churn"] == "yes")
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return RegionFiles(
        data=data,
        schema=REPO / "configs" / "schemas" / "synthetic_crm.yaml",
        state=state,
        run=run,
        scratch=scratch,
        customers=consented,
    )


def data_owner_commands(files: RegionFiles, *, repetition: int = 0) -> dict[str, list[str]]:
    """``fedcrm`` argument lists of the data owner's day; ``repetition`` picks other customers and files so
    that a command that changes the state (forget, consent, export) can run again."""
    state, region = str(files.state), ["--region", REGION]
    first, second, third = files.customers[3 * repetition : 3 * repetition + 3]
    scratch = files.scratch / str(repetition)
    return {
        "budget": ["budget", *region, "--state", state],
        "budget --accountant prv": ["budget", *region, "--state", state, "--accountant", "prv"],
        "forget": ["forget", *region, "--customer-id", first, "--run", str(files.run), "--state", state],
        "erasures status": ["erasures", "status", *region, "--state", state],
        "consent withdraw": [
            *("consent", "withdraw", *region, "--customer-id", second, "--purpose", "churn"),
            *("--run", str(files.run), "--state", state),
        ],
        "export": [
            *("export", *region, "--customer-id", third, "--data", str(files.data)),
            *("--schema", str(files.schema), "--out", str(scratch / "export.json"), "--state", state),
        ],
        "audit verify": ["audit", "verify", str(files.state / REGION / "audit.log")],
        "certs": ["certs", "--out", str(scratch / "certs")],
        "certs node-key": ["certs", "node-key", *region, "--out", str(scratch / "node-key")],
        "bundle keygen": ["bundle", "keygen", "--name", "dpo", "--out", str(scratch / "signer")],
        "bundle hash": ["bundle", "hash", str(REPO)],
    }


def model_commands(files: RegionFiles, *, repetition: int = 0) -> dict[str, list[str]]:
    """The commands that load a run's served model (torch for the model, nothing of the federation)."""
    state, region, scratch = str(files.state), ["--region", REGION], files.scratch / str(repetition)
    customer = files.customers[-1 - repetition]
    return {
        "score": [
            *("score", *region, "--model", str(files.run), "--data", str(files.data)),
            *("--out", str(scratch / "scores.csv"), "--state", state),
        ],
        "explain": [
            *("explain", *region, "--customer-id", customer, "--model", str(files.run)),
            *("--data", str(files.data), "--state", state),
        ],
        "export --run": [
            *("export", *region, "--customer-id", customer, "--data", str(files.data), "--schema", str(files.schema)),
            *("--out", str(scratch / "export-run.json"), "--run", str(files.run), "--state", state),
        ],
    }


def fedcrm_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedcrm.cli", *args]


def wall(argv: list[str]) -> float:
    """Seconds from start to exit of ``argv``, which must succeed."""
    t = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_startup")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    shutil.rmtree(args.out, ignore_errors=True)
    files = region_state(args.out, customers=args.customers)
    bin_dir = Path(sys.executable).parent
    anchors = {
        "flwr --version": [str(bin_dir / "flwr"), "--version"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "fedcrm --version": fedcrm_argv(["--version"]),
    }
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    print(f"{'command':<28} {'first s':>8} {'again s':>8}", flush=True)
    rows: list[tuple[str, list[str], list[str]]] = [(name, argv, argv) for name, argv in anchors.items()]
    for table in (data_owner_commands, model_commands):
        once, twice = table(files, repetition=0), table(files, repetition=1)
        rows += [(name, fedcrm_argv(once[name]), fedcrm_argv(twice[name])) for name in once]
    for name, first, again in rows:
        print(f"{name:<28} {wall(first):>8.2f} {wall(again):>8.2f}", flush=True)
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)


if __name__ == "__main__":
    main()
