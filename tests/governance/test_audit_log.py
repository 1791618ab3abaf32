"""The audit log: its format, and that every kind of tampering is found at the right line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcrm.errors import StorageError
from fedcrm.governance.audit_log import (
    GENESIS_PREV,
    AuditAction,
    AuditLog,
    verify,
)

N = 5  # entries in the sample log; line n holds seq n - 1


def _canon(obj: object) -> bytes:
    """The canonical JSON of the spec, written out here independently of the module."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sample_log(tmp_path: Path) -> AuditLog:
    log = AuditLog.open(tmp_path / "audit" / "log.jsonl")
    log.append(actor="ml-engineer", action="run_started", details={"config": "configs/churn.yaml"})
    for i in range(1, N):
        log.append(actor="eu-west", action=AuditAction.PRIVACY_SPENT, details={"round": i, "epsilon": i / 8})
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _forged_line(*, seq: int, prev: str) -> bytes:
    """A well-formed entry whose own hash is right, as a forger who knows the format would write it."""
    fields = {
        "seq": seq,
        "time": "2030-01-01T00:00:00.000000+00:00",
        "actor": "eu-west",
        "action": "erasure_served",
        "details": {"customers": 0},
        "prev": prev,
    }
    fields["hash"] = hashlib.sha256(_canon(fields)).hexdigest()
    return _canon(fields) + b"\n"


# --- a clean log -------------------------------------------------------------------------------------


def test_clean_log_verifies_and_lists_entries_in_order(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    report = verify(log.path)
    assert report.ok, report.problem
    assert (report.entries, report.first_bad_line, report.problem) == (N, None, "")
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(N))
    assert entries[0].action == "run_started"
    assert entries[3].details == {"round": 3, "epsilon": 3 / 8}


def test_entries_follow_the_documented_format(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    assert len(lines) == N and all(line.endswith(b"\n") for line in lines)
    prev = GENESIS_PREV
    for seq, line in enumerate(lines):
        obj = json.loads(line)
        assert set(obj) == {"seq", "time", "actor", "action", "details", "prev", "hash"}
        assert line == _canon(obj) + b"\n"  # canonical on disk
        assert obj["seq"] == seq
        assert obj["time"].endswith("+00:00")  # UTC
        assert obj["prev"] == prev
        unhashed = {k: v for k, v in obj.items() if k != "hash"}
        assert obj["hash"] == hashlib.sha256(_canon(unhashed)).hexdigest()
        prev = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    assert GENESIS_PREV == "0" * 64


def test_empty_log_verifies_with_no_entries(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "log.jsonl")
    assert verify(log.path).ok
    assert verify(log.path).entries == 0
    assert log.entries() == []


def test_missing_log_does_not_verify(tmp_path: Path) -> None:
    report = verify(tmp_path / "nowhere.jsonl")
    assert not report.ok
    assert "no audit log" in report.problem


def test_open_creates_parent_directories(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "a" / "b" / "log.jsonl")
    assert log.path.is_file()
    assert log.path.read_bytes() == b""


# --- tampering ----------------------------------------------------------------------------------------


def test_edited_detail_value_is_reported_as_altered_at_its_line(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    assert b'"epsilon":0.25' in lines[2]
    lines[2] = lines[2].replace(b'"epsilon":0.25', b'"epsilon":0.05')
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == 3
    assert report.entries == 2
    assert "line 3" in report.problem and "altered" in report.problem
    assert str(log.path) in report.problem


def test_deleted_middle_line_is_reported_as_removed_at_the_next_line(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    del lines[2]  # seq 2
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == 3
    assert "removed" in report.problem and "seq 2" in report.problem


def test_swapped_lines_are_reported_as_reordered_at_the_first_moved_line(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == 2
    assert "reordered" in report.problem


@pytest.mark.parametrize("keep", ["one byte", "half", "all but the newline"])
def test_truncated_last_line_is_reported_as_torn(tmp_path: Path, keep: str) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    last = lines[-1]
    cut = {"one byte": 1, "half": len(last) // 2, "all but the newline": len(last) - 1}[keep]
    lines[-1] = last[:cut]
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == N
    assert report.entries == N - 1
    assert "torn" in report.problem


def test_corrupt_middle_line_is_not_reported_as_torn(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines[1] = lines[1][: len(lines[1]) // 2] + b"\n"
    _write(log, lines)
    report = verify(log.path)
    assert report.first_bad_line == 2
    assert "not valid JSON" in report.problem
    assert "torn" not in report.problem


def test_forged_appended_line_with_own_hash_but_wrong_prev_is_detected_at_its_line(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines.append(_forged_line(seq=N, prev="ab" * 32))
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == N + 1
    assert report.entries == N
    assert "does not chain" in report.problem


def test_forged_line_inserted_with_correct_prev_breaks_the_chain_at_the_next_line(tmp_path: Path) -> None:
    # A forger who copies the previous line's hash into `prev` makes the inserted line itself look
    # right; the entry after it no longer follows, and that is where the chain breaks.
    log = _sample_log(tmp_path)
    lines = _lines(log)
    prev = hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()
    lines.insert(2, _forged_line(seq=2, prev=prev))
    _write(log, lines)
    report = verify(log.path)
    assert not report.ok
    assert report.first_bad_line == 4
    assert "duplicated or inserted" in report.problem


def test_forged_first_entry_must_start_from_the_genesis_value(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "log.jsonl")
    log.path.write_bytes(_forged_line(seq=0, prev="11" * 32))
    report = verify(log.path)
    assert (report.ok, report.first_bad_line) == (False, 1)
    assert "genesis" in report.problem


def test_reformatted_line_with_the_same_content_is_detected(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines[3] = json.dumps(json.loads(lines[3]), sort_keys=True).encode() + b"\n"  # spaces after , and :
    _write(log, lines)
    report = verify(log.path)
    assert report.first_bad_line == 4
    assert "canonical" in report.problem


def test_entries_refuses_a_broken_chain(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    with pytest.raises(StorageError, match="line 2"):
        log.entries()


# --- appending ------------------------------------------------------------------------------------------


def test_append_after_a_torn_tail_raises_and_leaves_the_file_unchanged(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines[-1] = lines[-1][:20]
    _write(log, lines)
    before = log.path.read_bytes()
    with pytest.raises(StorageError) as err:
        log.append(actor="eu-west", action="run_finished", details={})
    message = str(err.value)
    assert f"{log.path}:{N}:" in message
    assert "torn" in message and "remove" in message
    assert log.path.read_bytes() == before


def test_append_after_an_altered_last_entry_raises_and_leaves_the_file_unchanged(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    lines = _lines(log)
    lines[-1] = lines[-1].replace(b'"round":4', b'"round":9')
    _write(log, lines)
    before = log.path.read_bytes()
    with pytest.raises(StorageError, match="altered"):
        log.append(actor="eu-west", action="run_finished", details={})
    assert log.path.read_bytes() == before


def test_unknown_action_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    before = log.path.read_bytes()
    with pytest.raises(ValueError, match="run_deleted"):
        log.append(actor="ml-engineer", action="run_deleted", details={})
    assert log.path.read_bytes() == before


@pytest.mark.parametrize("details", [{"ids": {1, 2}}, {"epsilon": float("nan")}])
def test_details_that_are_not_plain_json_are_refused(tmp_path: Path, details: dict[str, object]) -> None:
    log = AuditLog.open(tmp_path / "log.jsonl")
    with pytest.raises(ValueError, match="details"):
        log.append(actor="ml-engineer", action="run_started", details=details)
    assert log.path.read_bytes() == b""


def test_append_returns_the_entry_as_written(tmp_path: Path) -> None:
    log = _sample_log(tmp_path)
    entry = log.append(actor="eu-west", action="refusal", details={"reason": "budget exhausted"})
    assert entry == log.entries()[-1]
    assert entry.seq == N


def test_log_survives_reopen_and_continues_the_chain(tmp_path: Path) -> None:
    first = _sample_log(tmp_path)
    again = AuditLog.open(first.path)
    entry = again.append(actor="eu-west", action="run_finished", details={"rounds": N - 1})
    assert entry.seq == N
    assert entry.prev == hashlib.sha256(_lines(first)[N - 1].rstrip(b"\n")).hexdigest()
    report = verify(first.path)
    assert report.ok and report.entries == N + 1


def test_concurrent_appenders_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    AuditLog.open(path)
    code = (
        "import sys\n"
        "from fedcrm.governance.audit_log import AuditLog\n"
        "log = AuditLog.open(sys.argv[1])\n"
        "for i in range(25):\n"
        "    log.append(actor=sys.argv[2], action='privacy_spent', details={'round': i})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"node-{k}"]) for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    report = verify(path)
    assert report.ok, report.problem
    assert report.entries == 100
