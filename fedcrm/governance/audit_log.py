"""A tamper-evident, append-only audit log: runs, budget spend, refusals, erasures and exports.

The log is a JSON Lines file. Each line is one entry in canonical JSON (sorted keys, no spaces, UTF-8)::

    {"action":"erasure_served","actor":"eu-west","details":{...},"hash":"…","prev":"…","seq":7,"time":"…"}

``seq`` counts from 0; ``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``;
``prev`` is the SHA-256 of the previous entry's whole canonical line (``GENESIS_PREV`` for seq 0). So an
entry cannot be edited, removed, moved or inserted without breaking the chain at that line, which
:func:`verify` reports with the line number as an editor shows it.

What a bare hash chain cannot show: someone who rewrites the chain from some line to the end, or cuts
whole entries off the end. To catch those, the log's **head** (the last entry's ``hash``, see
:meth:`AuditLog.head`) is recorded where the log's writer cannot take it back: ``summary.json`` of a run,
every erasure receipt handed to the data owner. ``verify(path, expect_head=H)`` (``fedcrm audit verify
LOG --expect-head H``) then fails unless ``H`` is the hash of an intact entry of the chain: cutting that
entry off, or rewriting the chain before it, loses ``H``. Entries appended since are fine.

Customer ids never go into the log in clear: pass them through :func:`hash_customer_id` (or
:meth:`AuditLog.customer_ref`) with the log's secret salt, kept next to the log in ``<log>.salt``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from fedcrm.durable import append_to, storage_error
from fedcrm.errors import StorageError


class AuditAction(str, Enum):
    """The things the audit log records. ``append`` refuses any other action."""

    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    RUN_FAILED = "run_failed"
    PRIVACY_SPENT = "privacy_spent"
    REFUSAL = "refusal"
    POLICY_CHANGED = "policy_changed"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    ERASURE_REQUESTED = "erasure_requested"
    ERASURE_SERVED = "erasure_served"
    ERASURE_OVERDUE = "erasure_overdue"
    EXPORT_REQUESTED = "export_requested"
    EXPORT_SERVED = "export_served"
    MODEL_PUBLISHED = "model_published"
    PREFLIGHT = "preflight"  # a run's pre-flight: the exact counts behind the public figures sent
    MODEL_SCORED = "model_scored"  # `fedcrm score` at a region: counts and model version, never ids


ACTIONS: frozenset[str] = frozenset(a.value for a in AuditAction)
GENESIS_PREV = "0" * 64
FIELDS: frozenset[str] = frozenset({"seq", "time", "actor", "action", "details", "prev", "hash"})
SALT_BYTES = 32
_TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log, as written."""

    seq: int
    time: str
    actor: str
    action: str
    details: dict[str, Any]
    prev: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "details": self.details,
            "prev": self.prev,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`.

    ``entries`` counts the entries that verified before the first problem (all of them when ``ok``);
    ``first_bad_line`` is 1-based, as an editor shows it; ``problem`` is empty when ``ok``. ``head`` is
    the hash of the last intact entry (``GENESIS_PREV`` for none); ``anchored_seq`` the seq of the entry
    whose hash was the expected head, when one was given and found.
    """

    ok: bool
    entries: int
    first_bad_line: int | None
    problem: str
    head: str = GENESIS_PREV
    anchored_seq: int | None = None


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN or infinity: the one byte form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of an entry's fields other than ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def line_digest(line: bytes) -> str:
    """What the next entry's ``prev`` must be: SHA-256 (hex) of this entry's canonical line."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


# --- customer ids -----------------------------------------------------------------------------------


def hash_customer_id(customer_id: str, *, salt: bytes) -> str:
    """HMAC-SHA256 (hex) of a customer id under a secret salt, so the log never holds the id in clear.

    The salt must stay secret: customer ids are often short or sequential, so without it anyone could
    hash every candidate id and match the log.
    """
    if not isinstance(customer_id, str) or not customer_id:
        raise ValueError(f"customer_id must be a non-empty string, got {customer_id!r}")
    if len(salt) < 16:
        raise ValueError(f"salt must be at least 16 bytes, got {len(salt)}")
    return hmac.new(salt, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()


def salt_path(log_path: str | os.PathLike[str]) -> Path:
    """Where the salt of the log at ``log_path`` lives: ``<log>.salt`` next to it."""
    p = Path(log_path)
    return p.with_name(p.name + ".salt")


def load_or_create_salt(log_path: str | os.PathLike[str]) -> bytes:
    """Load the log's salt file, creating it (random, mode 0600) if it does not exist yet.

    Creation goes through a temporary file and a hard link, so a concurrent reader never sees a
    half-written salt and two writers cannot end up with different salts.
    """
    path = salt_path(log_path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            append_to(fd, secrets.token_bytes(SALT_BYTES).hex().encode("ascii") + b"\n")
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first; use theirs
        finally:
            tmp.unlink()
        _fsync_dir(path.parent)
    return _load_salt(path)


def _load_salt(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise StorageError(
            f"{path}: the audit log salt is readable by other users (mode {oct(mode & 0o777)}); "
            f"it must stay secret, or customer ids in the log can be recovered. Run `chmod 600 {path}`."
        )
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != SALT_BYTES:
        raise StorageError(
            f"{path}: expected {SALT_BYTES * 2} hex digits of salt, found {len(text)} characters. "
            "The salt file is damaged; restore it from a backup (a new salt would not match the "
            "customer references already in the log)."
        )
    return salt


# --- reading and checking ---------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key `{key}`")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"`{name}` is not a number canonical JSON allows")


def _parse_line(raw: bytes) -> AuditEntry | str:
    """The entry on one line (without its newline), or what is wrong with it, in words."""
    if not raw:
        return "is empty"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not valid UTF-8 text"
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON ({exc.msg} at column {exc.colno})"
    except ValueError as exc:
        return f"is not a valid entry ({exc})"
    if not isinstance(obj, dict):
        return f"is not an audit entry (a JSON {type(obj).__name__}, not an object)"
    missing, extra = sorted(FIELDS - obj.keys()), sorted(obj.keys() - FIELDS)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        return f"is not an audit entry ({'; '.join(parts)})"
    expected_types: dict[str, type] = {
        "time": str,
        "actor": str,
        "action": str,
        "details": dict,
        "prev": str,
        "hash": str,
    }
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool):
        return f"has a `seq` that is not an integer ({obj['seq']!r})"
    for name, typ in expected_types.items():
        if not isinstance(obj[name], typ):
            return f"has a `{name}` that is not a {typ.__name__} ({obj[name]!r})"
    return AuditEntry(**obj)


def _entry_problem(entry: AuditEntry, raw: bytes) -> str | None:
    """What is wrong with a parsed entry on its own (not its place in the chain), if anything."""
    if entry_hash(entry.as_dict()) != entry.hash:
        return f"(seq {entry.seq}) was altered after it was written: its content does not match its hash"
    if canonical_json(entry.as_dict()) != raw:
        return (
            f"(seq {entry.seq}) is not in the canonical form AuditLog writes: "
            "it was rewritten by hand or by another tool"
        )
    if entry.action not in ACTIONS:
        return f"(seq {entry.seq}) has an unknown action `{entry.action}`"
    return None


def _check(data: bytes) -> tuple[list[AuditEntry], VerifyReport]:
    """Walk the chain over the file's bytes; stop at the first problem."""
    raws = data.split(b"\n")
    torn = raws[-1] != b""  # a complete file ends with a newline, leaving an empty last piece
    if not torn:
        raws.pop()
    parsed = [_parse_line(raw) for raw in raws]
    line_of_seq: dict[int, int] = {}
    for n, p in enumerate(parsed, start=1):
        if isinstance(p, AuditEntry):
            line_of_seq.setdefault(p.seq, n)

    good: list[AuditEntry] = []
    prev = GENESIS_PREV
    def head() -> str:
        return good[-1].hash if good else GENESIS_PREV

    for n, (raw, p) in enumerate(zip(raws, parsed, strict=True), start=1):
        problem: str | None
        if torn and n == len(raws):
            problem = (
                f"line {n} is torn: the file ends in the middle of an entry (no newline), so the last "
                f"write was cut off, e.g. by a crash or a full disk; lines before it are intact"
            )
        elif isinstance(p, str):
            problem = f"line {n} {p}"
        else:
            own = _entry_problem(p, raw)
            if own is not None:
                problem = f"line {n} {own}"
            else:
                problem = _chain_problem(p, n=n, expected_seq=len(good), prev=prev, line_of_seq=line_of_seq)
            if problem is None:
                good.append(p)
                prev = line_digest(raw)
                continue
        return good, VerifyReport(ok=False, entries=len(good), first_bad_line=n, problem=problem, head=head())
    return good, VerifyReport(ok=True, entries=len(good), first_bad_line=None, problem="", head=head())


def _chain_problem(
    entry: AuditEntry, *, n: int, expected_seq: int, prev: str, line_of_seq: Mapping[int, int]
) -> str | None:
    """What is wrong with an intact entry's place in the chain, if anything."""
    if entry.seq < expected_seq:
        return (
            f"line {n} has seq {entry.seq} where {expected_seq} was expected: seq {entry.seq} appeared "
            f"earlier, so this entry was duplicated or inserted"
        )
    if entry.seq > expected_seq:
        where = line_of_seq.get(expected_seq)
        if where is not None and where > n:
            return (
                f"line {n} has seq {entry.seq} where {expected_seq} was expected, and seq {expected_seq} "
                f"is at line {where}: entries were reordered"
            )
        gone = (
            f"the entry with seq {expected_seq} was removed"
            if entry.seq == expected_seq + 1
            else f"the entries with seqs {expected_seq}-{entry.seq - 1} were removed"
        )
        return f"line {n} has seq {entry.seq} where {expected_seq} was expected: {gone}"
    if entry.prev != prev:
        if n == 1:
            return "line 1 (seq 0) does not start the chain: its `prev` is not the genesis value"
        return (
            f"line {n} (seq {entry.seq}) does not chain to line {n - 1}: its `prev` is not the hash of "
            f"that line, so an entry was inserted, replaced or removed here"
        )
    return None


def verify(path: str | os.PathLike[str], *, expect_head: str | None = None) -> VerifyReport:
    """Check the whole chain of the audit log at ``path`` and say where it first breaks, if it does.

    With ``expect_head`` (a head recorded earlier), the chain must also hold an intact entry with that
    hash: a log cut back before it, or rewritten from before it, fails.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return VerifyReport(ok=False, entries=0, first_bad_line=None, problem=f"there is no audit log at {p}")
    except OSError as exc:
        raise StorageError(f"{p}: cannot read the audit log: {exc}") from exc
    good, report = _check(data)
    if not report.ok:
        return replace(report, problem=f"{p}: {report.problem}")
    if expect_head is None:
        return report
    seq = next((e.seq for e in good if e.hash == expect_head.strip().lower()), None)
    if seq is None and expect_head.strip().lower() == GENESIS_PREV:
        seq = -1  # the head of an empty log: every log descends from it
    if seq is None:
        return replace(report, ok=False, problem=(
            f"{p}: the recorded head {expect_head} is not the hash of any entry: entries were cut off the "
            f"end of the log or the chain was rewritten since that head was recorded (the log now has "
            f"{report.entries} intact entries, head {report.head})"))
    return replace(report, anchored_seq=seq)


# --- writing ----------------------------------------------------------------------------------------


class AuditLog:
    """The append-only audit log at one path. Get one with :meth:`AuditLog.open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._salt: bytes | None = None

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

    def append(
        self, *, actor: str, action: AuditAction | str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Write one entry, durably (fsync), chained to the last one, and return it.

        Refuses (StorageError, file untouched) if the last line is torn or damaged: appending after it
        would hide the damage or chain onto garbage.
        """
        action_name = action.value if isinstance(action, AuditAction) else action
        if action_name not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(sorted(ACTIONS))}; got {action_name!r}")
        if not isinstance(actor, str) or not actor.strip():
            raise ValueError(
                f"actor must be a non-empty string (an operator or node identity), got {actor!r}"
            )
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
        good, report = _check(data)
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

    def customer_ref(self, customer_id: str) -> str:
        """The salted hash under which ``customer_id`` may appear in this log's details."""
        if self._salt is None:
            self._salt = load_or_create_salt(self.path)
        return hash_customer_id(customer_id, salt=self._salt)

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
        parsed = _parse_line(raw)
        problem = parsed if isinstance(parsed, str) else _entry_problem(parsed, raw)
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
