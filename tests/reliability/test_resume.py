"""A server killed mid-run resumes from its last completed round, and nothing is lost or under-counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config
from flwr.app import Context, Message

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger
from fedcrm.runs import completed_rounds, load_weights, read_metrics

ROUNDS = 4


def record_first_start(store: Path) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """Test-only client mod: keep the weights each region is first asked to train from (clients are
    processes, so on disk: ``store/<region>.npz``)."""

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        region = str(context.node_config.get("region"))
        if msg.metadata.message_type == "train" and wire.ARRAYS in msg.content:
            path = store / f"{region}.npz"
            if not path.exists():
                store.mkdir(parents=True, exist_ok=True)
                np.savez(path, **{k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()})  # type: ignore[arg-type]
        return call_next(msg, context)

    return mod


@pytest.mark.slow  # two full runs, one killed mid-way (~95 s): make test-slow
def test_killed_run_resumes_from_its_checkpoints_and_keeps_every_charge(tmp_path: Path) -> None:
    """A resumed run cannot equal an uninterrupted one bit for bit: each round retried after the crash is a
    new release with fresh noise. What holds: the checkpoints of the rounds completed before the crash are
    kept as they were, training continues from the last of them, and every release ever made stays charged."""
    path = write_tiny_config(tmp_path, overrides={"training.rounds": ROUNDS})
    cfg = load_config(path)
    reference = run_simulated(
        cfg, run_dir=tmp_path / "reference", state_root=tmp_path / "ref-state", report=lambda s: None
    )

    run_dir, state = tmp_path / "run", tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcrm.cli", "run", str(path), "--out", str(run_dir), "--state", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir / "metrics.jsonl")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and every Ray process it started
        proc.wait()
    assert not (run_dir / "summary.json").exists()
    done = completed_rounds(run_dir).get(0, 0)
    assert 1 <= done < ROUNDS
    checkpoints = {
        p.name: p.read_bytes()
        for p in (run_dir / "checkpoints").glob("round-*-shard-0.npz")
        if int(p.name.split("-")[1]) <= done
    }
    assert len(checkpoints) == done
    ledgers = {r: PrivacyLedger.open(state / r, region=r) for r in ("eu", "us")}
    before = {r: ledger.events() for r, ledger in ledgers.items()}

    lines: list[str] = []
    resumed = run_simulated(
        cfg,
        run_dir=run_dir,
        state_root=state,
        report=lines.append,
        resume=True,
        client_mods=[record_first_start(tmp_path / "starts")],
    )
    assert any(f"resuming shard 0 after round {done}" in ln for ln in lines)
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")][-1] == ROUNDS

    # The rounds completed before the crash are kept as they were, not trained again.
    for name, data in checkpoints.items():
        assert (run_dir / "checkpoints" / name).read_bytes() == data, f"checkpoint {name} changed on resuming"
    # Training continued from the last of them: every region was asked to train from exactly those weights.
    last = load_weights(run_dir / "checkpoints" / f"round-{done:04d}-shard-0.npz")
    for region in ("eu", "us"):
        with np.load(tmp_path / "starts" / f"{region}.npz") as start:
            assert sorted(start.files) == sorted(last)
            for k in last:
                assert np.array_equal(start[k], last[k]), f"{region} resumed from other weights than round {done}'s"
    final = load_weights(run_dir / "model" / "constituent-0.npz")
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert not all(np.array_equal(final[k], last[k]) for k in last)  # and trained on after it

    for region, ledger in ledgers.items():
        events = ledger.events()
        # Nothing recorded before the crash was lost or changed, a release in flight included.
        assert events[: len(before[region])] == before[region]
        training = [e for e in events if e.mechanism == MECHANISM_DP_SGD]
        assert {e.round for e in training} == set(range(1, ROUNDS + 1))
        # Every round after the last checkpoint was released again by the resumed run: a new release
        # (its own ledger event and fresh noise), charged on top of any release in flight at the crash.
        first_new = max((e.id for e in before[region]), default=0)
        retried = sorted(e.round for e in training if e.id > first_new)
        assert retried == list(range(done + 1, ROUNDS + 1))
        assert len(training) >= ROUNDS
        assert resumed.privacy[region]["releases_this_run"] >= len(training)
        # Charging twice can only raise ε: never below the uninterrupted run's.
        assert resumed.privacy[region]["epsilon"] >= reference.privacy[region]["epsilon"] - 1e-9
