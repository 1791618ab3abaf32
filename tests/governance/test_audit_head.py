"""The audit log's head anchors it: a log cut back or rewritten since a head was recorded fails
`verify(..., expect_head=...)` and `fedcrm audit verify --expect-head`."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.governance.audit_log import GENESIS_PREV, AuditAction, AuditLog, verify


def _log(path: Path, n: int) -> AuditLog:
    log = AuditLog.open(path)
    for i in range(n):
        log.append(actor="region:eu", action=AuditAction.PRIVACY_SPENT, details={"round": i})
    return log


def test_the_head_is_the_last_entrys_hash_and_genesis_when_empty(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "audit.log")
    assert log.head() == GENESIS_PREV
    last = log.append(actor="server", action=AuditAction.RUN_STARTED)
    assert log.head() == last.hash == verify(log.path).head
    assert verify(log.path, expect_head=GENESIS_PREV).ok  # every log grew from the empty one


def test_a_truncated_log_fails_its_recorded_head_though_its_chain_is_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = _log(path, 4).head()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the last entry cut off: what a bare chain cannot see
    assert verify(path).ok
    report = verify(path, expect_head=head)
    assert not report.ok and "cut off the end" in report.problem and report.head != head

    res = CliRunner().invoke(app, ["audit", "verify", str(path), "--expect-head", head])
    assert res.exit_code == 1 and "BAD" in res.output and head in res.output


def test_a_rewritten_chain_fails_its_recorded_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = _log(path, 3).head()
    path.unlink()
    _log(path, 3)  # the same actions written again: a valid chain, not the recorded one
    assert verify(path).ok and not verify(path, expect_head=head).ok


def test_entries_appended_after_the_head_keep_it_valid(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = _log(path, 2)
    head = log.head()
    log.append(actor="server", action=AuditAction.RUN_FINISHED)
    report = verify(path, expect_head=head)
    assert report.ok and report.anchored_seq == 1 and report.head != head

    res = CliRunner().invoke(app, ["audit", "verify", str(path), "--expect-head", head])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and f"head: {report.head}" in res.output and "1 entries written since" in res.output
