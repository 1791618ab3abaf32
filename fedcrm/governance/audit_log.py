"""A tamper-evident, append-only audit log: runs, budget spend, refusals, erasures and exports.

This module writes the log: one entry at a time, durably, chained to the last one, under a lock. The
format, the chain and ``verify`` are :mod:`fedcrm.governance.audit_chain` (re-exported here); the head
(:meth:`AuditLog.head`) anchors the log as it is now, for ``verify(path, expect_head=H)``.

A plain :class:`AuditLog` (the server's, a run folder's) holds no customer references and needs no
key. A region's log names customers only as keyed hashes under the region's secret:
:class:`fedcrm.governance.customer_refs.RegionAuditLog`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedcrm.durable import append_to, storage_error
from fedcrm.errors import StorageError
from fedcrm.governance.audit_chain import (
    ACTIONS,
    FIELDS,
    GENESIS_PREV,
    AuditAction,
    AuditEntry,
    VerifyReport,
    canonical_json,
    check_chain,
    entry_hash,
    entry_problem,
    line_digest,
    parse_line,
    verify,
)

# What other modules import from here: the log's format lives in audit_chain, this is its door.
__all__ = [
    "ACTIONS",
    "AUDIT_FILE",
    "FIELDS",
    "GENESIS_PREV",
    "AuditAction",
    "AuditEntry",
    "AuditLog",
    "VerifyReport",
    "canonical_json",
    "entry_hash",
    "line_digest",
    "verify",
]

AUDIT_FILE = "audit.log"  # the log's name in a region's state folder and in a run folder
_TAIL_CHUNK = 64 * 1024


class AuditLog:
    """The append-only audit log at one path. Get one with :meth:`AuditLog.open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> AuditLog:
        """The log at ``path``, creating it (and its parent directories) empty if it does not exist."""
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            existed = p.exists()
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.close(fd)
            if not existed:
                _fsync_dir(p.parent)
        except OSError as exc:
            raise StorageError(f"{p}: cannot open the audit log: {exc}") from exc
        return cls(p)

    def append(self, *, actor: str, action: AuditAction | str, details: Mapping[str, Any] | None = None) -> AuditEntry:
        """Write one entry, durably (fsync), chained to the last one, and return it.

        Refuses (StorageError, file untouched) if the last line is torn or damaged: appending after it
        would hide the damage or chain onto garbage.
        """
        action_name = action.value if isinstance(action, AuditAction) else action
        if action_name not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(sorted(ACTIONS))}; got {action_name!r}")
        if not isinstance(actor, str) or not actor.strip():
            raise ValueError(f"actor must be a non-empty string (an operator or node identity), got {actor!r}")
        try:
            details_copy = json.loads(canonical_json(dict(details or {})))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details must be a JSON object with finite numbers: {exc}") from exc

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the audit log: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until close: one writer between tail read and write
            seq, prev = self._tail(fd)
            fields: dict[str, Any] = {
                "seq": seq,
                "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "actor": actor,
                "action": action_name,
                "details": details_copy,
                "prev": prev,
            }
            entry = AuditEntry(**fields, hash=entry_hash(fields))
            append_to(fd, canonical_json(entry.as_dict()) + b"\n")  # cut back if the disk is full
        except OSError as exc:
            raise storage_error(self.path, "append to the audit log", exc) from exc
        finally:
            os.close(fd)
        return entry

    def entries(self) -> list[AuditEntry]:
        """All entries, in order, after checking the whole chain; StorageError if it is broken."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot read the audit log: {exc}") from exc
        good, report = check_chain(data)
        if not report.ok:
            raise StorageError(f"{self.path}: {report.problem}")
        return good

    def verify(self) -> VerifyReport:
        """Same as :func:`verify` on this log's path."""
        return verify(self.path)

    def head(self) -> str:
        """The last entry's hash (``GENESIS_PREV`` when empty): record it to anchor the log as it is now.

        StorageError if the last line is torn or altered (then there is no head to vouch for).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return GENESIS_PREV
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot read the audit log: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # not between an appender's tail read and its write
            last = self._last_entry(fd)
        finally:
            os.close(fd)
        return GENESIS_PREV if last is None else last.hash

    def _tail(self, fd: int) -> tuple[int, str]:
        """The next entry's (seq, prev), from the last line; StorageError if that line is not intact."""
        last = self._last_entry(fd)
        if last is None:
            return 0, GENESIS_PREV
        return last.seq + 1, line_digest(canonical_json(last.as_dict()))

    def _last_entry(self, fd: int) -> AuditEntry | None:
        """The entry on the last line (None for an empty log); StorageError if that line is not intact."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        last = _read_last_line(fd, size)
        if not last.endswith(b"\n"):
            n = _count_newlines(fd, size) + 1
            raise StorageError(
                f"{self.path}:{n}: the last line is torn (the file ends without a newline: an earlier "
                f"write was cut off, e.g. by a crash or a full disk). Nothing was appended. Keep a copy "
                f"of the file, check the rest with `fedcrm.governance.audit_log.verify`, then remove the "
                f"partial line {n} (it never became an entry) and append again."
            )
        raw = last[:-1]
        parsed = parse_line(raw)
        problem = parsed if isinstance(parsed, str) else entry_problem(parsed, raw)
        if problem is not None or not isinstance(parsed, AuditEntry):
            n = _count_newlines(fd, size)
            raise StorageError(
                f"{self.path}:{n}: the last line {problem}. Nothing was appended. Run "
                f"`fedcrm.governance.audit_log.verify` on the file and restore it from a backup or "
                f"investigate before writing to it again."
            )
        return parsed


def _read_last_line(fd: int, size: int) -> bytes:
    """The last line of the file (with its newline, if it has one), reading backwards in chunks."""
    buf = b""
    pos = size
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut != -1:
            return buf[cut + 1 :]
    return buf


def _count_newlines(fd: int, size: int) -> int:
    count, pos = 0, 0
    while pos < size:
        chunk = os.pread(fd, min(_TAIL_CHUNK * 16, size - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def _fsync_dir(directory: Path) -> None:
    """Make a file's creation durable: fsync the directory that names it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
