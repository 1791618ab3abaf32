"""The disk filling up: every writer reports the file and what to do, and loses nothing already recorded.

A real full filesystem (a small tmpfs mounted for the test, then filled by another file, as another
program on the machine would), not a patched ``write``. Mounting needs root; elsewhere these skip.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.errors import StorageError
from fedcrm.fl.simulation import run_simulated
from fedcrm.governance.audit_log import AuditLog
from fedcrm.governance.export import write_export
from fedcrm.privacy.accountant import GaussianRelease
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import RunDir, completed_rounds, load_weights, read_metrics, save_weights
from fedcrm.unlearning.shards import region_secret, region_secret_path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB filesystem of its own, unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here to make a small filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with a file another program might have written."""
    filler = disk / "filler.bin"
    for chunk in (b"\0" * 65536, b"\0" * 512, b"\0"):  # down to the last byte
        with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    return filler


def test_metrics_weights_audit_and_ledger_writes_on_a_full_disk(small_disk: Path) -> None:
    cfg = load_config(write_tiny_config(small_disk.parent / "cfg"))
    run = RunDir.create(small_disk / "run", cfg)
    run.append_metrics({"round": 1, "shard": 0, "note": "x" * 100})
    save_weights(run.checkpoint_path(round_=1, shard=0), {"w": np.ones(8, np.float32)})
    audit = AuditLog.open(small_disk / "audit.log")
    audit.append(actor="test", action="run_started", details={"n": 1})
    ledger = PrivacyLedger.open(small_disk / "state", region="eu")
    ledger.record_release(
        shard=0, purpose="churn", run_id="r", round=1, release=GaussianRelease(1.0, 0.01, 10), delta=1e-5
    )
    metrics_before = (run.path / "metrics.jsonl").read_bytes()
    audit_before = audit.path.read_bytes()

    filler = fill(small_disk)
    big = {"round": 2, "shard": 0, "regions": {f"r{i}": "x" * 64 for i in range(2000)}}
    with pytest.raises(
        StorageError,
        match=r"metrics\.jsonl: cannot append the round's metrics: the disk is full"
        r".*--resume",
    ):
        run.append_metrics(big)
    assert (run.path / "metrics.jsonl").read_bytes() == metrics_before  # no torn line left behind

    checkpoint = run.checkpoint_path(round_=2, shard=0)
    with pytest.raises(StorageError, match=rf"{checkpoint}: cannot save model weights: the disk is full"):
        run.save_checkpoint(round_=2, shard=0, weights={"w": np.ones(200_000, np.float32)})
    assert not checkpoint.exists() and not list(run.path.glob("checkpoints/*.tmp"))
    assert np.array_equal(load_weights(run.checkpoint_path(round_=1, shard=0))["w"], np.ones(8))

    with pytest.raises(StorageError, match="audit.log: cannot append to the audit log: the disk is full"):
        audit.append(actor="test", action="run_finished", details={"blob": "y" * 100_000})
    assert audit.path.read_bytes() == audit_before
    assert len(audit.entries()) == 1  # the chain still verifies

    with pytest.raises(StorageError, match="privacy ledger: the disk is full"):
        for i in range(2, 5000):  # SQLite fills its free pages first; keep writing until the disk says no
            ledger.record_release(
                shard=0,
                purpose="churn",
                run_id="r",
                round=i,
                release=GaussianRelease(1.0, 0.01, 10),
                delta=1e-5,
                note="z" * 2000,
            )
    written = ledger.events()
    assert written[0].round == 1 and [e.round for e in written] == list(range(1, len(written) + 1))

    # Space freed: every writer carries on where it stopped, nothing to repair by hand.
    filler.unlink()
    run.append_metrics({"round": 2, "shard": 0})
    assert [r["round"] for r in read_metrics(run.path / "metrics.jsonl")] == [1, 2]
    audit.append(actor="test", action="run_finished", details={})
    assert len(audit.entries()) == 2
    ledger.record_release(
        shard=0, purpose="churn", run_id="r", round=9999, release=GaussianRelease(1.0, 0.01, 10), delta=1e-5
    )
    assert ledger.events()[-1].round == 9999


def test_a_run_whose_disk_fills_stops_cleanly_and_resumes_once_space_is_freed(small_disk: Path, tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, overrides={"training.rounds": 4}))
    run_dir, state = small_disk / "run", tmp_path / "state"  # the ledgers live on another disk
    filler: list[Path] = []

    def report(line: str) -> None:
        if line.startswith("round   2/"):  # another program fills the disk during round 3
            filler.append(fill(small_disk))

    with pytest.raises(StorageError, match="the disk is full") as info:
        run_simulated(cfg, run_dir=run_dir, state_root=state, report=report)
    assert str(run_dir) in str(info.value) and "--resume" in str(info.value)
    rows = read_metrics(run_dir / "metrics.jsonl")  # intact: no torn line
    assert [r["round"] for r in rows][:2] == [1, 2]
    done = completed_rounds(run_dir)[0]  # the last round whose metrics *and* checkpoint landed
    assert done in (1, 2)
    ledgers = {r: PrivacyLedger.open(state / r, region=r) for r in ("eu", "us")}
    # Training releases only (the served model's evaluation answers are releases of the hold-out).
    before = {r: [e.round for e in ledger.events() if e.mechanism == "dp_sgd"] for r, ledger in ledgers.items()}
    for rounds in before.values():  # every release that left is on record, none was dropped
        assert rounds == [r["round"] for r in rows]

    filler[0].unlink()
    summary = run_simulated(cfg, run_dir=run_dir, state_root=state, report=lambda s: None, resume=True)
    assert completed_rounds(run_dir) == {0: 4}
    for region, ledger in ledgers.items():
        rounds = [e.round for e in ledger.events() if e.mechanism == "dp_sgd"]
        # Rounds after the last safe checkpoint ran again and are charged again, honestly.
        assert rounds == before[region] + list(range(done + 1, 5))
        # Every release of this run: its training rounds (retried ones twice) and the two evaluation answers.
        assert summary.privacy[region]["releases_this_run"] == len(rounds) + 2
    assert json.loads((run_dir / "summary.json").read_text())["final_metrics"] == summary.final_metrics


def test_region_secret_and_export_on_a_full_disk_are_whole_or_absent(small_disk: Path) -> None:
    """A secret cut short would be an empty key that silently re-keys every tombstone and shard; an
    export cut short would hand the customer half a file. Both are written whole or not at all."""
    state = small_disk / "state" / "eu"
    state.mkdir(parents=True)
    export = small_disk / "exports" / "cust-1.json"
    export.parent.mkdir()
    filler = fill(small_disk)

    with pytest.raises(StorageError, match=r"region_secret\.key: cannot create the region's secret: the disk is full"):
        region_secret(state)
    assert not region_secret_path(state).exists() and not list(state.glob("*.tmp"))
    with pytest.raises(StorageError, match=r"cust-1\.json: cannot write the export: the disk is full"):
        write_export("x" * 100_000, export)
    assert not export.exists() and not list(export.parent.iterdir())

    filler.unlink()
    secret = region_secret(state)
    assert len(secret) == 64 and region_secret(state) == secret  # made once, then read back
    assert stat.S_IMODE(region_secret_path(state).stat().st_mode) == 0o600
    write_export("{}\n", export)
    assert export.read_text() == "{}\n" and stat.S_IMODE(export.stat().st_mode) == 0o600


def test_an_empty_region_secret_is_refused_not_used(tmp_path: Path) -> None:
    """What an older fedcrm left after a secret's creation failed half-way."""
    region_secret_path(tmp_path).write_text("")
    with pytest.raises(StorageError, match=r"region_secret\.key: the region's secret is empty"):
        region_secret(tmp_path)
