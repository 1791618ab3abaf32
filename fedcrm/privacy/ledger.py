"""The region's privacy ledger: every DP release ever made from its data, kept durably on its own disk.

The budget belongs to the region's *data*, not to a run: a retrain, a second experiment or a resumed
run all spend from the same budget, so ε is always the composition of the full history in this file,
never of one run. Events are immutable rows (SQLite triggers refuse UPDATE and DELETE) and are written
*before* an update leaves the region (write-ahead): a crash between training and sending can only
over-count, never under-count.

Each event is a release on one SISA shard ``k`` of a partition into ``S`` shards (the event records
both). The server picks S per run, so one region's history holds releases made under several
partitions. A customer's ε is the composition of every event whose shard contained them: the
customers with the same shard index under every partition used (a *cell*) share one history, and the
region's ε, and every budget check, is that of the worst cell. With one partition this is the usual
parallel composition over shards (the region's ε is the largest shard's, not the sum).

Each event stores the δ it was made at and how its randomness was drawn (``secure`` or
``reproducible``, see :mod:`fedcrm.privacy.randomness`; ``seeded`` for releases recorded by fedcrm
before 0.2, whose noise the server could predict). A query composes at the δ it is given: the region's
policy fixes one δ for its whole history.

Layout 2 added the partition and the randomness; a layout-1 file is migrated when opened, its events
counted against every customer (their partition was not recorded) and marked ``seeded``.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fedcrm.errors import PrivacyBudgetError, StorageError
from fedcrm.privacy.accountant import AccountantName, GaussianRelease, NonPrivateRelease, Release, epsilon

LEDGER_FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = "2"
MECHANISM_DP_SGD = "dp_sgd"
MECHANISM_GAUSSIAN = "gaussian"  # one Gaussian mechanism on aggregates (evaluation histograms and sums)
MECHANISM_NON_PRIVATE = "non_private"  # a release without DP, allowed only by the policy: ε = ∞
NOISE_SECURE = "secure"
NOISE_REPRODUCIBLE = "reproducible"
NOISE_SEEDED = "seeded"  # layout-1 events: noise from a seed the server could derive
# Which customers an event read: the training customers or the hold-out, each named with the hold-out
# fraction that split them (``train:0.2``, ``holdout:0.2``); NULL: every customer (layout 1).
POPULATION_TRAIN = "train"
POPULATION_HOLDOUT = "holdout"
# Beyond this many cells the worst cell is bounded by composing every event (each customer's history
# is a subset of all events): looser, never lower.
MAX_CELLS = 4096
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
    "shards",
    "noise",
    "population",
)
_OUTCOME_COLUMNS = ("event_id", "time", "outcome", "reason")

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
    population TEXT
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
    f"{table}_no_{verb}"
    for table in ("meta", "events", "outcomes")
    for verb in ("update", "delete", "replace")
}

# Layout 1 -> 2, in one transaction: the events table is rebuilt (SQLite cannot change a CHECK), each
# old event kept with its id, its partition unknown (NULL: counted against every customer) and its
# noise marked seeded. The append-only triggers are dropped for the copy only and created again.
_MIGRATE_1_TO_2 = (
    "".join(f"DROP TRIGGER IF EXISTS {name};" for name in sorted(_EXPECTED_TRIGGERS))
    + "ALTER TABLE events RENAME TO events_v1;"
    + _EVENTS_TABLE
    + "INSERT INTO events SELECT id, time, region, shard, purpose, run_id, round, mechanism, noise_multiplier, "
    f"sample_rate, steps, delta, note, NULL, '{NOISE_SEEDED}', NULL FROM events_v1;"
    "DROP TABLE events_v1;"
    "DELETE FROM meta WHERE key = 'schema_version';"
    f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"
    "CREATE INDEX IF NOT EXISTS events_region_shard ON events (region, shard);"
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
    population: str | None  # train:<fraction> or holdout:<fraction>; None: everyone
    outcome: str | None
    outcome_reason: str

    @property
    def status(self) -> str:
        """Pending until marked: a pending event counts in ε like a sent one."""
        return self.outcome if self.outcome is not None else STATUS_PENDING

    @property
    def release(self) -> Release:
        if self.mechanism == MECHANISM_NON_PRIVATE:
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
        self.ledger_id = ""

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
                conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATE_1_TO_2} {_SCHEMA} {ledger_id} COMMIT;")
                conn.execute("PRAGMA legacy_alter_table=OFF")
                conn.execute("PRAGMA foreign_keys=ON")
                tables = self._tables(conn)
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

    def nonce(self, event_id: int) -> str:
        """The release's nonce for reproducible randomness: unique to this ledger and this event."""
        return f"{self.ledger_id}:{self.region}:{event_id}"

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
        shards: int = 1,
        purpose: str,
        run_id: str,
        round: int,
        release: Release,
        delta: float,
        noise: str = NOISE_SECURE,
        note: str = "",
        population: str | None = None,
        mechanism: str = MECHANISM_DP_SGD,
    ) -> int:
        """Write a release as pending *before* its update leaves the region; return the event id.

        Written first so that a crash after sending cannot lose the spend. Call :meth:`check_budget`
        before training, then this before sending, then :meth:`mark_outcome` once the send is known.
        ``shard`` is the shard read, of a partition into ``shards``; ``noise`` how the randomness was drawn;
        ``population`` which customers it read (:func:`population`; None: all of them); ``mechanism`` what
        a Gaussian release was (DP-SGD steps, or one Gaussian mechanism on aggregates).
        """
        if mechanism not in (MECHANISM_DP_SGD, MECHANISM_GAUSSIAN):
            raise ValueError(f"mechanism must be '{MECHANISM_DP_SGD}' or '{MECHANISM_GAUSSIAN}', got {mechanism!r}")
        if population is not None and population.split(":")[0] not in (POPULATION_TRAIN, POPULATION_HOLDOUT):
            raise ValueError(f"population must be train:<fraction> or holdout:<fraction>, got {population!r}")
        _check_int("shards", shards, minimum=1)
        _check_int("shard", shard, minimum=0)
        if shard >= shards:
            raise ValueError(f"shard must be below shards ({shards}), got {shard}")
        _check_int("round", round, minimum=0)
        _check_text("purpose", purpose)
        _check_text("run_id", run_id)
        if noise not in (NOISE_SECURE, NOISE_REPRODUCIBLE):
            raise ValueError(f"noise must be '{NOISE_SECURE}' or '{NOISE_REPRODUCIBLE}', got {noise!r}")
        if not isinstance(release, (GaussianRelease, NonPrivateRelease)):
            raise ValueError(f"release must be a GaussianRelease or NonPrivateRelease, got {type(release).__name__}")
        gaussian = isinstance(release, GaussianRelease)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {type(note).__name__}")
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT INTO events (time, region, shard, purpose, run_id, round, mechanism, "
                "noise_multiplier, sample_rate, steps, delta, note, shards, noise, population) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    self.region,
                    shard,
                    purpose,
                    run_id,
                    round,
                    mechanism if gaussian else MECHANISM_NON_PRIVATE,
                    float(release.noise_multiplier) if gaussian else 0.0,  # type: ignore[union-attr]
                    float(release.sample_rate) if gaussian else 1.0,  # type: ignore[union-attr]
                    int(release.steps) if gaussian else 1,  # type: ignore[union-attr]
                    float(delta),
                    note,
                    shards,
                    noise,
                    population,
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

    # -- composition over cells ------------------------------------------------------------------

    def _cells(
        self, events: list[LedgerEvent], *, fixed: tuple[int, int] | None = None, holdout: bool | None = None
    ) -> list[list[Release]]:
        """The histories of the cells: customers whom the same events read.

        The training customers split into cells by their shard under every partition used; the hold-out
        (never trained on while the region keeps one hold-out fraction) is one more cell, read by the
        evaluation releases. ``fixed = (S, k)`` keeps only training cells inside shard k of partition S;
        ``holdout`` True keeps only the hold-out cell, False only training cells. Beyond
        :data:`MAX_CELLS` cells, or once the region's hold-out fraction changed (so that a customer may
        have been in both), one history of every event bounds them all.
        """
        fractions = {e.population.split(":", 1)[1] for e in events if e.population}
        if len(fractions) > 1:
            return [[event.release for event in events]]
        everyone: list[Release] = []  # events that read every customer (no population recorded)
        all_trained: list[Release] = []  # events that read every training customer (S = 1)
        held_out: list[Release] = []
        by_partition: dict[int, dict[int, list[Release]]] = {}
        for event in events:
            if event.population and event.population.startswith(POPULATION_HOLDOUT):
                held_out.append(event.release)
                continue
            part = event.partition
            if part is None:
                (all_trained if event.population else everyone).append(event.release)
            else:
                by_partition.setdefault(part[0], {}).setdefault(part[1], []).append(event.release)
        holdout_cell = [everyone + held_out] if holdout is not False and fixed is None else []
        everyone = everyone + all_trained
        if holdout:
            return holdout_cell
        if fixed is not None and fixed[0] > 1:
            by_partition.setdefault(fixed[0], {})
        sizes = sorted(by_partition)
        choices = [
            [fixed[1]] if fixed is not None and size == fixed[0] else list(range(size)) for size in sizes
        ]
        if math.prod(len(c) for c in choices) > MAX_CELLS:
            return [[event.release for event in events]]
        return holdout_cell + [
            everyone + [r for size, k in zip(sizes, cell, strict=True) for r in by_partition[size].get(k, [])]
            for cell in itertools.product(*choices)
        ]

    def epsilon_of_holdout(
        self, *, delta: float, accountant: AccountantName | str, next_release: Release | None = None
    ) -> float:
        """The worst ε of a hold-out customer (evaluation releases), optionally after ``next_release``."""
        extra = [] if next_release is None else [next_release]
        return max(
            epsilon([*history, *extra], delta=delta, accountant=accountant)
            for history in self._cells(self.events(), holdout=True)
        )

    def epsilon_of_shard(
        self, *, shard: int, shards: int, delta: float, accountant: AccountantName | str,
        next_release: Release | Sequence[Release] | None = None,
    ) -> float:
        """The worst ε of a customer in shard ``shard`` of a partition into ``shards``, over the full history.

        With ``next_release`` (one or several), as if those releases on this shard were already recorded.
        """
        _check_int("shards", shards, minimum=1)
        _check_int("shard", shard, minimum=0)
        extra: list[Release] = []
        if isinstance(next_release, (GaussianRelease, NonPrivateRelease)):
            extra = [next_release]
        elif next_release is not None:
            extra = list(next_release)
        return max(
            epsilon([*history, *extra], delta=delta, accountant=accountant)
            for history in self._cells(self.events(), fixed=(shards, shard), holdout=False)
        )

    def epsilon_by_shard(self, *, shards: int, delta: float, accountant: AccountantName | str) -> dict[int, float]:
        """For each shard of a partition into ``shards``: the worst ε of a customer in it."""
        return {
            k: self.epsilon_of_shard(shard=k, shards=shards, delta=delta, accountant=accountant)
            for k in range(shards)
        }

    def partitions(self) -> list[int]:
        """The shard counts S that releases of this region were made under (1 for unsharded)."""
        return sorted({event.shards or 1 for event in self.events()})

    def epsilon(self, *, delta: float, accountant: AccountantName | str) -> float:
        """The region's ε: that of its worst-off customer, over every partition its history used.

        Summing over shards would charge each customer for releases that never touched them; taking the
        largest shard of one partition would miss customers whom releases under several partitions read.
        """
        events = self.events()
        if not events:
            return 0.0
        return max(epsilon(history, delta=delta, accountant=accountant) for history in self._cells(events))

    def check_budget(
        self,
        *,
        budget: float,
        delta: float,
        accountant: AccountantName | str,
        shard: int,
        shards: int = 1,
        next_release: Release,
        holdout: bool = False,
    ) -> float:
        """Worst ε in ``shard`` (of ``shards``), or of the hold-out, once ``next_release`` is added; refuse,
        recording nothing, if over ``budget``.

        Called before training (or answering), so a refused release costs neither compute nor privacy.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"budget must be a number > 0, got {budget!r}")

        def spend(release: Release | None) -> float:
            if holdout:
                return self.epsilon_of_holdout(delta=delta, accountant=accountant, next_release=release)
            return self.epsilon_of_shard(shard=shard, shards=shards, delta=delta, accountant=accountant,
                                         next_release=release)

        after = spend(next_release)
        if after > budget or math.isnan(after):
            spent = spend(None)
            where = "its hold-out" if holdout else f"shard {shard} of {shards}" if shards > 1 else "its customers"
            cause = (
                " Some of these customers were already released without DP (a `none` run), so no ε "
                "bound holds for them any more."
                if math.isinf(spent) else ""
            )
            raise PrivacyBudgetError(
                f"region {self.region}: this {'answer' if holdout else 'round'} would bring ε to {_fmt(after)} "
                f"on {where}, "
                f"over the budget {_fmt(budget)} (spent so far {_fmt(spent)}, δ = {delta:g}, "
                f"{accountant} accountant; releases under every partition this region used count).{cause} "
                "Nothing was trained or recorded. To go on, train with more noise (a larger noise_multiplier) "
                "or fewer steps, or have the data owner raise the region's budget in its policy."
            )
        return after

    def summary(self, *, delta: float, accountant: AccountantName | str, budget: float) -> dict[str, Any]:
        """What ``fedcrm budget --json`` prints: the spend, what remains, and the full audit trail."""
        events = self.events()
        spent = self.epsilon(delta=delta, accountant=accountant)
        by_partition = {
            str(size): {
                str(shard): eps
                for shard, eps in self.epsilon_by_shard(shards=size, delta=delta, accountant=accountant).items()
            }
            for size in self.partitions()
        }
        noise: dict[str, int] = {}
        for event in events:
            if event.mechanism != MECHANISM_NON_PRIVATE:
                noise[event.noise] = noise.get(event.noise, 0) + 1
        return {
            "region": self.region,
            "ledger": str(self.path),
            "budget": budget,
            "delta": delta,
            "accountant": accountant,
            "epsilon_spent": spent,
            "remaining": max(budget - spent, 0.0),
            # Per partition S used, per shard: the worst ε of a customer in that shard (all partitions
            # composed). JSON object keys are strings; make that explicit rather than leave it to json.dumps.
            "epsilon_by_shard": by_partition,
            "epsilon_holdout": self.epsilon_of_holdout(delta=delta, accountant=accountant) if events else 0.0,
            "releases_by_noise": noise,
            "non_private_releases": sum(1 for event in events if event.mechanism == MECHANISM_NON_PRIVATE),
            "n_events": len(events),
            "n_pending": sum(1 for event in events if event.outcome is None),
            "events": [event.as_dict() for event in events],
        }
