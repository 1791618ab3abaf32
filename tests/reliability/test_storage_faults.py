"""Torn, corrupted or missing files are detected and reported with the file and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcrm.errors import StorageError
from fedcrm.privacy.accountant import GaussianRelease
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import completed_rounds, load_weights, read_metrics, save_weights


def test_torn_last_metrics_line_is_reported_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": 1, "shard": 0}, {"round": 2, "shard": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 3, "sha')
    with pytest.raises(StorageError, match=rf"{path}:3: torn last line"):
        read_metrics(path)
    path.write_text(json.dumps(rows[0]) + "\n" + "garbage\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(StorageError, match=rf"{path}:2: damaged line"):
        read_metrics(path)


def test_corrupted_or_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "round-0001-shard-0.npz"
    save_weights(good, {"w": np.ones((2, 2), np.float32)})
    assert np.array_equal(load_weights(good)["w"], np.ones((2, 2)))
    bad = tmp_path / "round-0002-shard-0.npz"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(StorageError, match=rf"{bad}: model weights are damaged"):
        load_weights(bad)
    with pytest.raises(StorageError, match="not found"):
        load_weights(tmp_path / "round-0003-shard-0.npz")


def test_resume_point_needs_both_the_metrics_line_and_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    save_weights(tmp_path / "checkpoints" / "round-0001-shard-0.npz", {"w": np.zeros(1, np.float32)})
    lines = [{"round": 1, "shard": 0}, {"round": 2, "shard": 0}]  # round 2's checkpoint never landed
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert completed_rounds(tmp_path) == {0: 1}


def test_a_ledger_that_is_not_a_ledger_is_refused_and_left_in_place(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    ledger.record_release(
        shard=0, purpose="churn", run_id="r", round=1, release=GaussianRelease(1.0, 0.01, 100), delta=1e-5
    )
    path = tmp_path / "privacy_ledger.sqlite"
    data = path.read_bytes()
    path.write_bytes(b"not a database" + data[14:100])
    with pytest.raises(StorageError, match=str(path)):
        PrivacyLedger.open(tmp_path, region="eu")
    assert path.exists()  # never deleted: the spend it recorded must not vanish
