"""A server killed mid-run resumes from its last completed round, and nothing is lost or under-counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import load_weights, read_metrics

ROUNDS = 4


def test_killed_run_resumes_to_the_same_model_and_keeps_every_charge(tmp_path: Path) -> None:
    path = write_tiny_config(tmp_path, overrides={"training.rounds": ROUNDS})
    cfg = load_config(path)
    reference = run_simulated(cfg, run_dir=tmp_path / "reference", state_root=tmp_path / "ref-state",
                              report=lambda s: None)

    run_dir, state = tmp_path / "run", tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcrm.cli", "run", str(path), "--out", str(run_dir), "--state", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
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
    done_before = {r["round"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert done_before and max(done_before) < ROUNDS

    lines: list[str] = []
    resumed = run_simulated(cfg, run_dir=run_dir, state_root=state, report=lines.append, resume=True)
    assert any("resuming shard 0 after round" in ln for ln in lines)
    assert [r["round"] for r in read_metrics(run_dir / "metrics.jsonl")][-1] == ROUNDS

    final = load_weights(run_dir / "model" / "constituent-0.npz")
    expected = load_weights(tmp_path / "reference" / "model" / "constituent-0.npz")
    for k in expected:  # same seeds per round: the same model as an uninterrupted run
        np.testing.assert_allclose(final[k], expected[k], rtol=1e-5, atol=1e-6)
    assert resumed["final_metrics"]["auc"] == np.float64(reference["final_metrics"]["auc"]) or abs(
        resumed["final_metrics"]["auc"] - reference["final_metrics"]["auc"]) < 1e-3

    for region in ("eu", "us"):
        events = PrivacyLedger.open(state / region, region=region).events()
        rounds_charged = [e.round for e in events]
        # Every round is charged; a round in flight when the server died is charged again when resumed.
        assert set(rounds_charged) == set(range(1, ROUNDS + 1))
        assert len(events) >= ROUNDS
        assert resumed["privacy"][region]["releases_this_run"] == len(events)
        # Charging twice can only raise ε: never below the uninterrupted run's.
        assert resumed["privacy"][region]["epsilon"] >= reference["privacy"][region]["epsilon"] - 1e-9
