"""The privacy ledger's file: its SQLite layout, the append-only triggers, the migration from layout 1,
and the connections every read and write goes through. What the rows mean (composing them into ε, the
budget check) is :mod:`fedcrm.privacy.ledger`'s.

Layout 2 added the partition and the randomness; a layout-1 file is migrated when opened, its events
counted against every customer (their partition was not recorded) and marked ``seeded``. Layout 3 (fedcrm
0.2.0) adds each event's random nonce (NULL for the events before it). A file that is not a ledger, lost
its triggers or has another layout is refused with what to do, never rebuilt: it is the region's only
record of privacy spent.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fedcrm.errors import StorageError
from fedcrm.privacy.accountant import GaussianRelease, NonPrivateRelease, Release

LEDGER_FILENAME = "privacy_ledger.sqlite"
# Next to the ledger, placed by the data owner only to verify a release: event id -> the nonce to draw again
# (fedcrm.privacy.ledger.PrivacyLedger.replay).
REPLAY_FILENAME = "replay_nonces.json"
SCHEMA_VERSION = "3"
MECHANISM_DP_SGD = "dp_sgd"
MECHANISM_GAUSSIAN = "gaussian"  # one Gaussian mechanism on aggregates (evaluation histograms and sums)
MECHANISM_NON_PRIVATE = "non_private"  # a release without DP, allowed only by the policy: ε = ∞
NOISE_SECURE = "secure"
NOISE_REPRODUCIBLE = "reproducible"
NOISE_SEEDED = "seeded"  # layout-1 events: noise from a seed the server could derive
SEEDED_ACCEPTED_KEY = "seeded_accepted"  # meta key prefix: the data owner accepted a region's seeded releases
# Which customers an event read: the training customers or the hold-out, each named with the hold-out
# threshold that split them (``train:200000/1000000``, fedcrm.privacy.ledger_population); NULL: every
# customer (layout 1).
POPULATION_TRAIN = "train"
POPULATION_HOLDOUT = "holdout"
OUTCOME_SENT = "sent"
OUTCOME_NOT_SENT = "not_sent"
STATUS_PENDING = "pending"
Outcome = Literal["sent", "not_sent"]

EVENT_COLUMNS = (
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
    "shards",
    "noise",
    "population",
    "nonce",
)
OUTCOME_COLUMNS = ("event_id", "time", "outcome", "reason")

_EVENTS_TABLE = f"""
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    region TEXT NOT NULL,
    shard INTEGER NOT NULL CHECK (shard >= 0),
    purpose TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    mechanism TEXT NOT NULL
        CHECK (mechanism IN ('{MECHANISM_DP_SGD}', '{MECHANISM_GAUSSIAN}', '{MECHANISM_NON_PRIVATE}')),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0 OR mechanism = '{MECHANISM_NON_PRIVATE}'),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    note TEXT NOT NULL,
    shards INTEGER CHECK (shards IS NULL OR (shards >= 1 AND shard < shards)),
    noise TEXT NOT NULL CHECK (noise IN ('{NOISE_SECURE}', '{NOISE_REPRODUCIBLE}', '{NOISE_SEEDED}')),
    population TEXT,
    nonce TEXT
);
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
{_EVENTS_TABLE}
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
    f"{table}_no_{verb}" for table in ("meta", "events", "outcomes") for verb in ("update", "delete", "replace")
}

_DROP_TRIGGERS = "".join(f"DROP TRIGGER IF EXISTS {name};" for name in sorted(_EXPECTED_TRIGGERS))
_SET_VERSION = (
    "DELETE FROM meta WHERE key = 'schema_version';"
    f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"
)

# Layout 1 -> 3, in one transaction: the events table is rebuilt (SQLite cannot change a CHECK), each
# old event kept with its id, its partition unknown (NULL: counted against every customer), its
# noise marked seeded and no nonce. The append-only triggers are dropped for the copy only and created again.
_MIGRATE_1 = (
    _DROP_TRIGGERS
    + "ALTER TABLE events RENAME TO events_v1;"
    + _EVENTS_TABLE
    + "INSERT INTO events SELECT id, time, region, shard, purpose, run_id, round, mechanism, noise_multiplier, "
    f"sample_rate, steps, delta, note, NULL, '{NOISE_SEEDED}', NULL, NULL FROM events_v1;"
    "DROP TABLE events_v1;" + _SET_VERSION + "CREATE INDEX IF NOT EXISTS events_region_shard ON events (region, shard);"
)

# Layout 2 -> 3: a nonce column, NULL for the events already recorded (their nonce stays the one they
# were drawn with, see PrivacyLedger.nonce). Adding a column rewrites no row; the triggers are dropped
# only so that the version row may change, and created again.
_MIGRATE_2 = _DROP_TRIGGERS + "ALTER TABLE events ADD COLUMN nonce TEXT;" + _SET_VERSION
# What the migration tells the data owner (and `fedcrm budget` repeats while seeded releases remain).
SEEDED_MIGRATION_NOTE = (
    "this ledger was written by fedcrm 0.1 and has been migrated. Its releases are marked `seeded`: their "
    "noise came from a seed derived from the run's config, which the server could predict, so they count "
    "as ε = ∞ until the data owner accepts them with `fedcrm budget --accept-seeded` (audited). fedcrm 0.1's "
    "evaluation answers were exact (no noise) and were never recorded in the ledger: no ε bounds what they "
    "revealed about the customers they scored."
)


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
    shards: int | None  # None: recorded before partitions were (layout 1), counted against everyone
    noise: str
    population: str | None  # train:<threshold>/<scale> or holdout:<threshold>/<scale>; None: everyone
    nonce: str | None  # the release's random nonce (None: recorded before layout 3)
    outcome: str | None
    outcome_reason: str
    # A migrated 0.1 release (``seeded``) counts as ε = ∞ until the data owner accepted its predictable
    # noise (fedcrm.governance.seeded_releases): the server could derive that noise and subtract it.
    seeded_accepted: bool = False

    @property
    def status(self) -> str:
        """Pending until marked: a pending event counts in ε like a sent one."""
        return self.outcome if self.outcome is not None else STATUS_PENDING

    @property
    def release(self) -> Release:
        if self.mechanism == MECHANISM_NON_PRIVATE or (self.noise == NOISE_SEEDED and not self.seeded_accepted):
            return NonPrivateRelease()
        return GaussianRelease(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def partition(self) -> tuple[int, int] | None:
        """(S, k): the event read shard k of a partition into S shards; None when it read everyone."""
        if self.shards is None or self.shards == 1:
            return None
        return self.shards, self.shard

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


class LedgerStore:
    """The ledger's SQLite file at one path, for one region: created, checked and migrated on open.

    Each call opens its own short-lived connection, so an object holds no open file and any number of
    objects (or processes) see the same durable history.
    """

    def __init__(self, path: Path, *, region: str) -> None:
        """Use :meth:`open`, which creates and checks the file; this only stores where it is."""
        self.path = path
        self.region = region
        self.ledger_id = ""
        self._session: sqlite3.Connection | None = None

    @contextmanager
    def session(self) -> Iterator[None]:
        """Use one connection for every call inside the block, then close it.

        A region's round reads and writes its ledger some ten times; a connection each (opened, set up,
        checkpointed and closed) was a quarter of a small region's work per round. Inside a session every
        call still commits on its own (autocommit), so what each call makes durable is unchanged, and
        other processes see every write as before. Sessions do not nest: an inner one uses the outer's.
        """
        if self._session is not None:
            yield
            return
        with self._connect() as conn:
            self._session = conn
            try:
                yield
            finally:
                self._session = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run every call inside the block as one write transaction on the ledger file, or none of it.

        ``BEGIN IMMEDIATE`` takes the file's write lock before the first read, so what the block reads
        (the history a budget check composes, the answers counted today) cannot change before what it
        writes commits: a region serves messages concurrently, from threads and processes, each with its
        own connection, and every one of them waits here for the others.
        """
        with self.session(), self._connect() as conn:
            if conn.in_transaction:  # transactions do not nest: an inner block is part of the outer one
                yield
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _next_nonce(self, conn: sqlite3.Connection) -> str:
        """The random nonce of the event about to be inserted (inside a transaction on ``conn``).

        Random, not the event id: a ledger restored from a backup gives its next releases ids already used,
        and keys made from ids alone would repeat. Only a replay file the data owner placed brings a
        recorded nonce back, for the event id it was recorded under.
        """
        replay = self.path.with_name(REPLAY_FILENAME)
        if replay.exists():
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            next_id = (0 if row is None else int(row[0])) + 1
            try:
                recorded = json.loads(replay.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StorageError(
                    f"{replay}: cannot read the replay file ({exc}); expected a JSON object of event id -> "
                    "nonce. Remove it unless you are verifying a release."
                ) from exc
            nonce = recorded.get(str(next_id)) if isinstance(recorded, dict) else None
            if isinstance(nonce, str) and nonce:
                return nonce
        return secrets.token_hex(16)

    def _damaged(self, what: str) -> StorageError:
        return StorageError(
            f"{self.path}: {what}. This file is the region's record of privacy spent, and without it the "
            "remaining budget is unknown: restore it from a backup. Do not delete it to start afresh, "
            "that would forget every release already made from this data."
        )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self._session is not None:  # inside session(): its connection, whose errors it translates
            yield self._session
            return
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._damaged(f"cannot be opened ({exc})") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a release is on disk before reserve returns, so the write-ahead holds
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
        # The ledger's own random identity: part of every reproducible release's nonce, so two ledgers
        # (a deleted and re-created one included) never derive the same keys.
        ledger_id = (
            f"INSERT INTO meta (key, value) SELECT 'ledger_id', '{secrets.token_hex(16)}' "
            "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'ledger_id');"
        )
        with self._connect() as conn:
            tables = self._tables(conn)
            if not tables:
                # IF NOT EXISTS, WHERE NOT EXISTS: two processes creating the same new ledger both succeed.
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta (key, value) "
                    f"SELECT 'schema_version', '{SCHEMA_VERSION}' "
                    f"WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'schema_version'); {ledger_id} COMMIT;"
                )
                tables = self._tables(conn)
            elif self._version(conn) == "1" and {"meta", "events", "outcomes"} <= tables:
                # Keep outcomes' reference to `events` through the rename, and check it after the copy.
                conn.execute("PRAGMA foreign_keys=OFF")
                conn.execute("PRAGMA legacy_alter_table=ON")
                conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_1} {_SCHEMA} {ledger_id} COMMIT;")
                conn.execute("PRAGMA legacy_alter_table=OFF")
                conn.execute("PRAGMA foreign_keys=ON")
                tables = self._tables(conn)
                warnings.warn(f"{self.path}: {SEEDED_MIGRATION_NOTE}", UserWarning, stacklevel=3)
            elif self._version(conn) == "2" and {"meta", "events", "outcomes"} <= tables:
                try:
                    conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_2} {_SCHEMA} {ledger_id} COMMIT;")
                except sqlite3.OperationalError:
                    # Another process opening the same layout-2 file migrated it first (its column exists).
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if self._version(conn) != SCHEMA_VERSION:
                        raise
            self._check_layout(conn, tables)
            self.ledger_id = self._meta(conn, "ledger_id") or ""

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else str(row[0])

    def _version(self, conn: sqlite3.Connection) -> str | None:
        return self._meta(conn, "schema_version")

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        }

    def _check_layout(self, conn: sqlite3.Connection, tables: set[str]) -> None:
        missing = {"meta", "events", "outcomes"} - tables
        if missing:
            raise self._damaged(
                f"is a SQLite file but not a privacy ledger (missing tables: {', '.join(sorted(missing))})"
            )
        for table, expected in (("events", EVENT_COLUMNS), ("outcomes", OUTCOME_COLUMNS)):
            found = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
            if found != expected:
                raise self._damaged(f"table {table} has columns {', '.join(found)}, expected {', '.join(expected)}")
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
