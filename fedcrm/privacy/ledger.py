"""The region's privacy ledger: every DP release ever made from its data, kept durably on its own disk.

The budget belongs to the region's *data*, not to a run: a retrain, a second experiment or a resumed
run all spend from the same budget, so ε is always the composition of the full history in this file,
never of one run. Events are immutable rows (SQLite triggers refuse UPDATE and DELETE) and are written
*before* an update leaves the region (write-ahead): a crash between training and sending can only
over-count, never under-count.

Each event is a DP-SGD release on one SISA shard. Every customer lies in exactly one shard, so by
parallel composition a customer's ε is that of their shard's history alone, and the region's ε is the
largest over its shards, not their sum.

Each event stores the δ its run targeted, for the audit trail, but a query always composes at the δ it
is given: the same δ must be used for every release of a budget, so mixing the stored ones would say
nothing meaningful.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fedcrm.errors import PrivacyBudgetError, StorageError
from fedcrm.privacy.accountant import AccountantName, GaussianRelease, epsilon

LEDGER_FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = "1"
MECHANISM_DP_SGD = "dp_sgd"
OUTCOME_SENT = "sent"
OUTCOME_NOT_SENT = "not_sent"
STATUS_PENDING = "pending"
Outcome = Literal["sent", "not_sent"]

_EVENT_COLUMNS = (
    "id",
    "time",
    "region",
    "shard",
    "purpose",
    "run_id",
    "round",
    "mechanism",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "note",
)
_OUTCOME_COLUMNS = ("event_id", "time", "outcome", "reason")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    region TEXT NOT NULL,
    shard INTEGER NOT NULL CHECK (shard >= 0),
    purpose TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    mechanism TEXT NOT NULL CHECK (mechanism = '{MECHANISM_DP_SGD}'),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_region_shard ON events (region, shard);
CREATE TABLE IF NOT EXISTS outcomes (
    event_id INTEGER PRIMARY KEY REFERENCES events (id),
    time TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('{OUTCOME_SENT}', '{OUTCOME_NOT_SENT}')),
    reason TEXT NOT NULL
);
""" + "".join(
    f"""
CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table}
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: {table} rows cannot be {done}'); END;
"""
    for table in ("meta", "events", "outcomes")
    for verb, done in (("UPDATE", "changed"), ("DELETE", "deleted"))
)

# INSERT OR REPLACE deletes the old row without firing DELETE triggers (unless a connection turns on
# recursive_triggers), so inserting over an existing key is refused outright.
_SCHEMA += "".join(
    f"""
CREATE TRIGGER IF NOT EXISTS {table}_no_replace BEFORE INSERT ON {table}
WHEN EXISTS (SELECT 1 FROM {table} WHERE {key} = NEW.{key})
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: {table} rows cannot be replaced'); END;
"""
    for table, key in (("meta", "key"), ("events", "id"), ("outcomes", "event_id"))
)

_EXPECTED_TRIGGERS = {
    f"{table}_no_{verb}"
    for table in ("meta", "events", "outcomes")
    for verb in ("update", "delete", "replace")
}


@dataclass(frozen=True)
class LedgerEvent:
    """One release as read back from the ledger, with its outcome (None while still pending)."""

    id: int
    time: str
    region: str
    shard: int
    purpose: str
    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    note: str
    outcome: str | None
    outcome_reason: str

    @property
    def status(self) -> str:
        """Pending until marked: a pending event counts in ε like a sent one."""
        return self.outcome if self.outcome is not None else STATUS_PENDING

    @property
    def release(self) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, self.sample_rate, self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


class PrivacyLedger:
    """Append-only record of a region's DP releases in ``<state_dir>/privacy_ledger.sqlite``.

    Each call opens its own short-lived connection, so a ledger object holds no open file and any
    number of objects (or processes) see the same durable history. One file may hold several regions;
    a ledger object reads and writes only its own region's rows.
    """

    def __init__(self, path: Path, *, region: str) -> None:
        """Use :meth:`open`, which creates and checks the file; this only stores where it is."""
        self.path = path
        self.region = region

    @classmethod
    def open(cls, state_dir: Path, *, region: str) -> PrivacyLedger:
        """Open the region's ledger in ``state_dir``, creating both if new; refuse a damaged file."""
        _check_text("region", region)
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{state_dir}: cannot create the privacy ledger's directory: {exc}") from exc
        ledger = cls(state_dir / LEDGER_FILENAME, region=region)
        ledger._create_or_check()
        return ledger

    # -- storage -------------------------------------------------------------------------------------

    def _damaged(self, what: str) -> StorageError:
        return StorageError(
            f"{self.path}: {what}. This file is the region's record of privacy spent, and without it the "
            "remaining budget is unknown: restore it from a backup. Do not delete it to start afresh, "
            "that would forget every release already made from this data."
        )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._damaged(f"cannot be opened ({exc})") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a release is on disk before record_release returns, so the write-ahead holds
            # through a power cut, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Belt and braces with the *_no_replace triggers: REPLACE's deletes then fire DELETE triggers.
            conn.execute("PRAGMA recursive_triggers=ON")
            yield conn
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            if "append-only" in str(exc):
                raise
            if isinstance(exc, sqlite3.OperationalError) and self._disk_full(exc):
                raise StorageError(
                    f"{self.path}: cannot write to the privacy ledger: the disk is full ({exc}). SQLite "
                    "rolled the write back, so every release recorded before is intact, and an update "
                    "whose release could not be recorded is never sent. Free space on that disk, then retry."
                ) from exc
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StorageError(
                    f"{self.path}: the privacy ledger stayed locked by another process for 30 s ({exc}); "
                    "check that no other client of this region is running, then retry."
                ) from exc
            raise self._damaged(f"is not a readable privacy ledger ({exc})") from exc
        finally:
            conn.close()

    @contextmanager
    def _connect_for_reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries, which still reads when the disk is full.

        WAL mode needs room for its shared-memory file even to read. When the disk has none and no
        write-ahead log is left over (the last writer checkpointed it into the main file on closing),
        the main file alone is the whole ledger and is read as immutable; otherwise the error stands.
        """
        try:
            with self._connect() as conn:
                yield conn
            return
        except StorageError:
            wal = self.path.with_name(self.path.name + "-wal")
            if not self._no_space() or (wal.exists() and wal.stat().st_size > 0):
                raise
        conn = sqlite3.connect(f"file:{quote(str(self.path))}?immutable=1", uri=True)
        try:
            yield conn
        finally:
            conn.close()

    def _no_space(self) -> bool:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1 << 20

    def _disk_full(self, exc: sqlite3.Error) -> bool:
        # In WAL mode SQLite reports a full disk as "disk I/O error" as often as "database or disk is full".
        return "full" in str(exc) or ("I/O error" in str(exc) and self._no_space())

    def _create_or_check(self) -> None:
        with self._connect() as conn:
            tables = self._tables(conn)
            if not tables:
                # IF NOT EXISTS, WHERE NOT EXISTS: two processes creating the same new ledger both succeed.
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta (key, value) "
                    f"SELECT 'schema_version', '{SCHEMA_VERSION}' "
                    "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'schema_version'); COMMIT;"
                )
                tables = self._tables(conn)
            self._check_layout(conn, tables)

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }

    def _check_layout(self, conn: sqlite3.Connection, tables: set[str]) -> None:
        missing = {"meta", "events", "outcomes"} - tables
        if missing:
            raise self._damaged(
                f"is a SQLite file but not a privacy ledger (missing tables: {', '.join(sorted(missing))})"
            )
        for table, expected in (("events", _EVENT_COLUMNS), ("outcomes", _OUTCOME_COLUMNS)):
            found = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
            if found != expected:
                raise self._damaged(
                    f"table {table} has columns {', '.join(found)}, expected {', '.join(expected)}"
                )
        triggers = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        if not triggers >= _EXPECTED_TRIGGERS:
            raise self._damaged(
                "its append-only triggers are missing "
                f"({', '.join(sorted(_EXPECTED_TRIGGERS - triggers))}), so rows may have been changed"
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != SCHEMA_VERSION:
            found_version = "none" if row is None else row[0]
            raise self._damaged(
                f"has ledger layout version {found_version}, this fedcrm reads version {SCHEMA_VERSION}"
            )

    # -- writing -------------------------------------------------------------------------------------

    def record_release(
        self,
        *,
        shard: int,
        purpose: str,
        run_id: str,
        round: int,
        release: GaussianRelease,
        delta: float,
        note: str = "",
    ) -> int:
        """Write a release as pending *before* its update leaves the region; return the event id.

        Written first so that a crash after sending cannot lose the spend. Call :meth:`check_budget`
        before training, then this before sending, then :meth:`mark_outcome` once the send is known.
        """
        _check_int("shard", shard, minimum=0)
        _check_int("round", round, minimum=0)
        _check_text("purpose", purpose)
        _check_text("run_id", run_id)
        if not isinstance(release, GaussianRelease):
            raise ValueError(f"release must be a GaussianRelease, got {type(release).__name__}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {type(note).__name__}")
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT INTO events (time, region, shard, purpose, run_id, round, mechanism, "
                "noise_multiplier, sample_rate, steps, delta, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    self.region,
                    shard,
                    purpose,
                    run_id,
                    round,
                    MECHANISM_DP_SGD,
                    float(release.noise_multiplier),
                    float(release.sample_rate),
                    int(release.steps),
                    float(delta),
                    note,
                ),
            )
            event_id = cursor.lastrowid
        if event_id is None:
            raise self._damaged("did not return an id for the release just written")
        return event_id

    def mark_outcome(self, event_id: int, outcome: Outcome | str, reason: str = "") -> None:
        """Record, once, whether a pending release's update left the region.

        Purely informative: a ``not_sent`` release still counts in ε, since nothing proves the noisy
        update never left (a crash may have come after the send).
        """
        if outcome not in (OUTCOME_SENT, OUTCOME_NOT_SENT):
            raise ValueError(f"outcome must be '{OUTCOME_SENT}' or '{OUTCOME_NOT_SENT}', got {outcome!r}")
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, got {type(reason).__name__}")
        with self._connect() as conn:
            row = conn.execute("SELECT region FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None or row[0] != self.region:
                raise PrivacyBudgetError(
                    f"region {self.region}: no release with id {event_id} in {self.path}, so its outcome "
                    "cannot be recorded; use the id that record_release returned."
                )
            try:
                conn.execute(
                    "INSERT INTO outcomes (event_id, time, outcome, reason) VALUES (?, ?, ?, ?)",
                    (event_id, _now(), outcome, reason),
                )
            except sqlite3.IntegrityError as exc:
                raise PrivacyBudgetError(
                    f"region {self.region}: release {event_id} already has an outcome in {self.path}; "
                    "an outcome is recorded once and never changed."
                ) from exc

    # -- reading -------------------------------------------------------------------------------------

    def events(self, shard: int | None = None) -> list[LedgerEvent]:
        """This region's events in the order they were recorded, of one shard or of all."""
        if shard is not None:
            _check_int("shard", shard, minimum=0)
        columns = ", ".join(f"e.{c}" for c in _EVENT_COLUMNS)
        query = (
            f"SELECT {columns}, o.outcome, o.reason FROM events e "
            "LEFT JOIN outcomes o ON o.event_id = e.id WHERE e.region = ?"
        )
        params: tuple[Any, ...] = (self.region,)
        if shard is not None:
            query += " AND e.shard = ?"
            params += (shard,)
        with self._connect_for_reading() as conn:
            rows = conn.execute(query + " ORDER BY e.id", params).fetchall()
        return [
            LedgerEvent(
                **dict(zip(_EVENT_COLUMNS, row[: len(_EVENT_COLUMNS)], strict=True)),
                outcome=row[-2],
                outcome_reason=row[-1] or "",
            )
            for row in rows
        ]

    def releases(self, shard: int) -> list[GaussianRelease]:
        """Every release on ``shard``, pending, sent and not sent alike: all of them count in ε."""
        return [event.release for event in self.events(shard)]

    def epsilon_by_shard(
        self, *, delta: float, accountant: AccountantName | str, known: Mapping[int, float] | None = None
    ) -> dict[int, float]:
        """ε of each shard's full history, at the query's ``delta``.

        ``known`` holds shards whose ε the caller has just composed at the same δ and accountant (e.g. the
        value :meth:`check_budget` returned before the release was recorded): they are not composed again.
        """
        known = known or {}
        by_shard: dict[int, list[GaussianRelease]] = {}
        for event in self.events():
            by_shard.setdefault(event.shard, []).append(event.release)
        return {
            shard: known[shard] if shard in known else epsilon(releases, delta=delta, accountant=accountant)
            for shard, releases in sorted(by_shard.items())
        }

    def epsilon(
        self, *, delta: float, accountant: AccountantName | str, known: Mapping[int, float] | None = None
    ) -> float:
        """The region's ε: the largest over its shards, by parallel composition.

        Every customer lies in exactly one shard and a release on shard k reads only shard k's
        customers, so a customer's privacy loss is their own shard's ε. Summing over shards would
        charge each customer for releases that never touched them.
        """
        per_shard = self.epsilon_by_shard(delta=delta, accountant=accountant, known=known)
        return max(per_shard.values(), default=0.0)

    def check_budget(
        self,
        *,
        budget: float,
        delta: float,
        accountant: AccountantName | str,
        shard: int,
        next_release: GaussianRelease,
    ) -> float:
        """ε on ``shard`` once ``next_release`` is added; refuse, recording nothing, if over ``budget``.

        Called before training, so a refused round costs neither compute nor privacy.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"budget must be a number > 0, got {budget!r}")
        _check_int("shard", shard, minimum=0)
        history = self.releases(shard)
        after = epsilon([*history, next_release], delta=delta, accountant=accountant)
        if after > budget or math.isnan(after):
            spent = epsilon(history, delta=delta, accountant=accountant)
            raise PrivacyBudgetError(
                f"region {self.region}: this round would bring ε to {_fmt(after)} on shard {shard}, "
                f"over the budget {_fmt(budget)} (spent so far {_fmt(spent)}, δ = {delta:g}, "
                f"{accountant} accountant). Nothing was trained or recorded. To go on, train with more "
                "noise (a larger noise_multiplier) or fewer steps, or have the data owner raise the "
                "region's budget in its policy."
            )
        return after

    def summary(self, *, delta: float, accountant: AccountantName | str, budget: float) -> dict[str, Any]:
        """What ``fedcrm budget --json`` prints: the spend, what remains, and the full audit trail."""
        events = self.events()
        per_shard = self.epsilon_by_shard(delta=delta, accountant=accountant)
        spent = max(per_shard.values(), default=0.0)
        return {
            "region": self.region,
            "ledger": str(self.path),
            "budget": budget,
            "delta": delta,
            "accountant": accountant,
            "epsilon_spent": spent,
            "remaining": max(budget - spent, 0.0),
            # JSON object keys are strings; make that explicit rather than leave it to json.dumps.
            "epsilon_by_shard": {str(shard): eps for shard, eps in per_shard.items()},
            "n_events": len(events),
            "n_pending": sum(1 for event in events if event.outcome is None),
            "events": [event.as_dict() for event in events],
        }
