"""The audit log's format and its checks: what an entry is, how entries chain, and where a chain breaks.

The log is a JSON Lines file. Each line is one entry in canonical JSON (sorted keys, no spaces, UTF-8)::

    {"action":"erasure_served","actor":"eu-west","details":{...},"hash":"…","prev":"…","seq":7,"time":"…"}

``seq`` counts from 0; ``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``;
``prev`` is the SHA-256 of the previous entry's whole canonical line (``GENESIS_PREV`` for seq 0). So an
entry cannot be edited, removed, moved or inserted without breaking the chain at that line, which
:func:`verify` reports with the line number as an editor shows it.

What a bare hash chain cannot show: someone who rewrites the chain from some line to the end, or cuts
whole entries off the end. To catch those, the log's **head** (the last entry's ``hash``, see
:meth:`fedcrm.governance.audit_log.AuditLog.head`) is recorded where the log's writer cannot take it
back: ``summary.json`` of a run, every erasure receipt handed to the data owner. ``verify(path,
expect_head=H)`` (``fedcrm audit verify LOG --expect-head H``) then fails unless ``H`` is the hash of an
intact entry of the chain: cutting that entry off, or rewriting the chain before it, loses ``H``.
Entries appended since are fine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

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
    # The region's customer refs moved from the log's own salt file to its region secret (once).
    CUSTOMER_KEY_CHANGED = "customer_key_changed"
    # The data owner accepted the predictable noise of releases migrated from fedcrm 0.1 (`seeded`).
    SEEDED_ACCEPTED = "seeded_accepted"


ACTIONS: frozenset[str] = frozenset(a.value for a in AuditAction)
GENESIS_PREV = "0" * 64
FIELDS: frozenset[str] = frozenset({"seq", "time", "actor", "action", "details", "prev", "hash"})


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
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of an entry's fields other than ``hash``."""
    return hashlib.sha256(canonical_json({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def line_digest(line: bytes) -> str:
    """What the next entry's ``prev`` must be: SHA-256 (hex) of this entry's canonical line."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key `{key}`")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"`{name}` is not a number canonical JSON allows")


def parse_line(raw: bytes) -> AuditEntry | str:
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


def entry_problem(entry: AuditEntry, raw: bytes) -> str | None:
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


def check_chain(data: bytes) -> tuple[list[AuditEntry], VerifyReport]:
    """Walk the chain over the file's bytes; stop at the first problem."""
    raws = data.split(b"\n")
    torn = raws[-1] != b""  # a complete file ends with a newline, leaving an empty last piece
    if not torn:
        raws.pop()
    parsed = [parse_line(raw) for raw in raws]
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
            own = entry_problem(p, raw)
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
    good, report = check_chain(data)
    if not report.ok:
        return replace(report, problem=f"{p}: {report.problem}")
    if expect_head is None:
        return report
    seq = next((e.seq for e in good if e.hash == expect_head.strip().lower()), None)
    if seq is None and expect_head.strip().lower() == GENESIS_PREV:
        seq = -1  # the head of an empty log: every log descends from it
    if seq is None:
        return replace(
            report,
            ok=False,
            problem=(
                f"{p}: the recorded head {expect_head} is not the hash of any entry: entries were cut off the "
                f"end of the log or the chain was rewritten since that head was recorded (the log now has "
                f"{report.entries} intact entries, head {report.head})"
            ),
        )
    return replace(report, anchored_seq=seq)
