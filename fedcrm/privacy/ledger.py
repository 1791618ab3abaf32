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

A release is checked and recorded in one transaction (:meth:`PrivacyLedger.reserve`): the budget check
composes the history as it is when the release is written, whatever else the region serves meanwhile.
Layout and migration: :mod:`fedcrm.privacy.ledger_store`; grouping events into cells:
:mod:`fedcrm.privacy.ledger_cells`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrm.errors import PolicyError, PrivacyBudgetError, StorageError
from fedcrm.privacy.accountant import AccountantName, GaussianRelease, NonPrivateRelease, Release, epsilon
from fedcrm.privacy.client_dp import epsilon_against_server
from fedcrm.privacy.ledger_cells import MAX_CELLS, cells
from fedcrm.privacy.ledger_population import population_label, population_threshold
from fedcrm.privacy.ledger_store import (
    EVENT_COLUMNS,
    LEDGER_FILENAME,
    MECHANISM_DP_SGD,
    MECHANISM_GAUSSIAN,
    MECHANISM_NON_PRIVATE,
    NOISE_REPRODUCIBLE,
    NOISE_SECURE,
    NOISE_SEEDED,
    OUTCOME_NOT_SENT,
    OUTCOME_SENT,
    POPULATION_HOLDOUT,
    POPULATION_TRAIN,
    REPLAY_FILENAME,
    SCHEMA_VERSION,
    SEEDED_ACCEPTED_KEY,
    LedgerEvent,
    LedgerStore,
    Outcome,
    check_int,
    check_text,
    utc_now,
)

# What other modules import from here: the ledger's vocabulary lives in ledger_store, this is its door.
__all__ = [
    "LEDGER_FILENAME",
    "DailyAllowance",
    "MAX_CELLS",
    "MECHANISM_DP_SGD",
    "MECHANISM_GAUSSIAN",
    "MECHANISM_NON_PRIVATE",
    "NOISE_REPRODUCIBLE",
    "NOISE_SECURE",
    "NOISE_SEEDED",
    "OUTCOME_NOT_SENT",
    "OUTCOME_SENT",
    "POPULATION_HOLDOUT",
    "POPULATION_TRAIN",
    "REPLAY_FILENAME",
    "SCHEMA_VERSION",
    "LedgerEvent",
    "PrivacyLedger",
    "population_label",
]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class DailyAllowance:
    """At most ``answers`` hold-out answers per UTC day, over every run: a window the region owns, where a
    run id is the server's to choose. ``source`` names the policy field that set it, for the refusal."""

    answers: int
    source: str


class PrivacyLedger(LedgerStore):
    """Append-only record of a region's DP releases in ``<state_dir>/privacy_ledger.sqlite``.

    Each call opens its own short-lived connection, so a ledger object holds no open file and any
    number of objects (or processes) see the same durable history. One file may hold several regions;
    a ledger object reads and writes only its own region's rows.
    """

    @classmethod
    def open(cls, state_dir: Path, *, region: str) -> PrivacyLedger:
        """Open the region's ledger in ``state_dir``, creating both if new; refuse a damaged file."""
        check_text("region", region)
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{state_dir}: cannot create the privacy ledger's directory: {exc}") from exc
        ledger = cls(state_dir / LEDGER_FILENAME, region=region)
        ledger._create_or_check()
        return ledger

    def nonce(self, event_id: int) -> str:
        """The release's nonce for reproducible randomness: unique to this ledger and this event.

        It ends with the random nonce stored with the event, so a ledger restored from a backup, which
        gives the next releases the ids of releases already made, still never repeats a key. An event
        recorded before 0.2.0 has none and keeps the nonce it was drawn with.
        """
        with self._connect_for_reading() as conn:
            row = conn.execute(
                "SELECT nonce FROM events WHERE id = ? AND region = ?", (event_id, self.region)
            ).fetchone()
        base = f"{self.ledger_id}:{self.region}:{event_id}"
        return base if row is None or row[0] is None else f"{base}:{row[0]}"

    def replay(self, source: PrivacyLedger) -> Path:
        """Have this ledger's next releases draw the keys that ``source`` recorded under the same ids.

        For verifying a reproducible release (an erasure retrain against a from-scratch run): the data owner
        copies the region's state as it was before the release, then re-runs it here with the recorded keys.
        Writes :data:`REPLAY_FILENAME` next to this ledger, which only the data owner can place; never leave
        one in a region that serves a server, whose releases would then share noise with ``source``'s.
        """
        path = self.path.with_name(REPLAY_FILENAME)
        nonces = {str(e.id): e.nonce for e in source.events() if e.nonce is not None}
        path.write_text(json.dumps(nonces, indent=1) + "\n", encoding="utf-8")
        return path

    def answers_today(self) -> int:
        """Hold-out answers (Gaussian releases on the hold-out) recorded since 00:00 UTC today."""
        since = utc_now()[:10]  # ISO times compare as text: every one of today's starts with the date
        with self._connect_for_reading() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM events WHERE region = ? AND mechanism = ? AND population LIKE ? AND time >= ?",
                (self.region, MECHANISM_GAUSSIAN, f"{POPULATION_HOLDOUT}:%", since),
            ).fetchone()
        return int(count)

    # -- writing -------------------------------------------------------------------------------------

    def reserve(
        self,
        *,
        budget: float | None,
        accountant: AccountantName | str | None = None,
        allowance: DailyAllowance | None = None,
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
        """Check a release against ``budget`` (and a hold-out answer against ``allowance``) and record it as
        pending, in one transaction, *before* it leaves the region; return its event id. Refuse, recording
        nothing, when it does not fit.

        The one verb for a release that may leave: a check and a write made apart would let concurrent
        requests all pass the check on the same history (8 at once with room for one released 7); written
        first, a crash after sending cannot lose the spend. Then :meth:`mark_outcome` once the send is known.
        ``budget`` None records without a check (a non-private release, allowed by the policy as such); a
        release on the hold-out population is checked against the hold-out's ε at ``accountant``, any other
        against its shard's. ``shard`` is the shard read, of a partition into ``shards``; ``noise`` how the
        randomness was drawn; ``population`` which customers it read (:func:`population_label`; None: all of
        them); ``mechanism`` what a Gaussian release was (DP-SGD steps, or one Gaussian mechanism on
        aggregates). Each event gets a fresh random nonce (see :meth:`nonce`).
        """
        if mechanism not in (MECHANISM_DP_SGD, MECHANISM_GAUSSIAN):
            raise ValueError(f"mechanism must be '{MECHANISM_DP_SGD}' or '{MECHANISM_GAUSSIAN}', got {mechanism!r}")
        if population is not None:
            if population.split(":")[0] not in (POPULATION_TRAIN, POPULATION_HOLDOUT):
                raise ValueError(f"population must be train:<threshold> or holdout:<threshold>, got {population!r}")
            population_threshold(population)  # raises, naming the form expected
        check_int("shards", shards, minimum=1)
        check_int("shard", shard, minimum=0)
        if shard >= shards:
            raise ValueError(f"shard must be below shards ({shards}), got {shard}")
        check_int("round", round, minimum=0)
        check_text("purpose", purpose)
        check_text("run_id", run_id)
        if noise not in (NOISE_SECURE, NOISE_REPRODUCIBLE):
            raise ValueError(f"noise must be '{NOISE_SECURE}' or '{NOISE_REPRODUCIBLE}', got {noise!r}")
        if not isinstance(release, (GaussianRelease, NonPrivateRelease)):
            raise ValueError(f"release must be a GaussianRelease or NonPrivateRelease, got {type(release).__name__}")
        gaussian = isinstance(release, GaussianRelease)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {type(note).__name__}")
        if budget is not None and accountant is None:
            raise ValueError("accountant is needed to check a release against a budget")
        holdout = population is not None and population.startswith(f"{POPULATION_HOLDOUT}:")
        with self.transaction(), self._connect() as conn:
            if allowance is not None:
                given = self.answers_today()
                if given >= allowance.answers:
                    raise PolicyError(
                        f"region {self.region}: it has given its {allowance.answers} evaluation answers of today "
                        f"(UTC; the policy's {allowance.source}); no more are given before 00:00 UTC"
                    )
            if budget is not None and accountant is not None:
                self.check_budget(
                    budget=budget,
                    delta=delta,
                    accountant=accountant,
                    shard=shard,
                    shards=shards,
                    next_release=release,
                    holdout=holdout,
                )
            # Inside the transaction, too: the nonce of a replayed release (see replay) is chosen for the
            # id the release will get.
            cursor = conn.execute(
                "INSERT INTO events (time, region, shard, purpose, run_id, round, mechanism, "
                "noise_multiplier, sample_rate, steps, delta, note, shards, noise, population, nonce) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    utc_now(),
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
                    self._next_nonce(conn),
                ),
            )
            event_id = cursor.lastrowid
        if event_id is None:
            raise self._damaged("did not return an id for the release just written")
        return event_id

    def record_release(self, **event: Any) -> int:
        """Record a release without a budget check: :meth:`reserve`'s arguments after ``allowance``.

        For writing a history (tests, tools); a release that may leave goes through :meth:`reserve`.
        """
        return self.reserve(budget=None, **event)

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
                    "cannot be recorded; use the id that reserve returned."
                )
            try:
                conn.execute(
                    "INSERT INTO outcomes (event_id, time, outcome, reason) VALUES (?, ?, ?, ?)",
                    (event_id, utc_now(), outcome, reason),
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
            check_int("shard", shard, minimum=0)
        columns = ", ".join(f"e.{c}" for c in EVENT_COLUMNS)
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
            accepted = self._meta(conn, self._seeded_key) is not None
        return [
            LedgerEvent(
                **dict(zip(EVENT_COLUMNS, row[: len(EVENT_COLUMNS)], strict=True)),
                outcome=row[-2],
                outcome_reason=row[-1] or "",
                seeded_accepted=accepted,
            )
            for row in rows
        ]

    # -- composition over cells ------------------------------------------------------------------
    def epsilon_of_holdout(
        self, *, delta: float, accountant: AccountantName | str, next_release: Release | None = None
    ) -> float:
        """The worst ε of a hold-out customer (evaluation releases), optionally after ``next_release``."""
        extra = [] if next_release is None else [next_release]
        return max(
            epsilon([*history, *extra], delta=delta, accountant=accountant)
            for history in cells(self.events(), holdout=True)
        )

    def epsilon_of_shard(
        self,
        *,
        shard: int,
        shards: int,
        delta: float,
        accountant: AccountantName | str,
        next_release: Release | Sequence[Release] | None = None,
    ) -> float:
        """The worst ε of a customer in shard ``shard`` of a partition into ``shards``, over the full history.

        With ``next_release`` (one or several), as if those releases on this shard were already recorded.
        """
        check_int("shards", shards, minimum=1)
        check_int("shard", shard, minimum=0)
        extra: list[Release] = []
        if isinstance(next_release, (GaussianRelease, NonPrivateRelease)):
            extra = [next_release]
        elif next_release is not None:
            extra = list(next_release)
        return max(
            epsilon([*history, *extra], delta=delta, accountant=accountant)
            for history in cells(self.events(), fixed=(shards, shard), holdout=False)
        )

    def epsilon_by_shard(self, *, shards: int, delta: float, accountant: AccountantName | str) -> dict[int, float]:
        """For each shard of a partition into ``shards``: the worst ε of a customer in it."""
        return {
            k: self.epsilon_of_shard(shard=k, shards=shards, delta=delta, accountant=accountant) for k in range(shards)
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
        return max(epsilon(history, delta=delta, accountant=accountant) for history in cells(events))

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

        :meth:`reserve` runs it inside its transaction; alone it is a preview (a retrain plan checks its
        releases fit before it starts), which a concurrent release may overtake.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"budget must be a number > 0, got {budget!r}")

        def spend(release: Release | None) -> float:
            if holdout:
                return self.epsilon_of_holdout(delta=delta, accountant=accountant, next_release=release)
            return self.epsilon_of_shard(
                shard=shard, shards=shards, delta=delta, accountant=accountant, next_release=release
            )

        after = spend(next_release)
        if after > budget or math.isnan(after):
            spent = spend(None)
            where = "its hold-out" if holdout else f"shard {shard} of {shards}" if shards > 1 else "its customers"
            cause = (
                " Some of these customers were already released without DP (a `none` run, or releases "
                "migrated from fedcrm 0.1 that the data owner has not accepted: `fedcrm budget --accept-seeded`), "
                "so no ε bound holds for them any more."
                if math.isinf(spent)
                else ""
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
            # Client-level DP rounds reached the server un-noised: against it their customers have no bound.
            "epsilon_against_server": epsilon_against_server(events, epsilon=spent),
            "remaining": max(budget - spent, 0.0),
            # Per partition S used, per shard: the worst ε of a customer in that shard (all partitions
            # composed). JSON object keys are strings; make that explicit rather than leave it to json.dumps.
            "epsilon_by_shard": by_partition,
            "epsilon_holdout": self.epsilon_of_holdout(delta=delta, accountant=accountant) if events else 0.0,
            "releases_by_noise": noise,
            "seeded_accepted": self.seeded_accepted(),  # the owner's acceptance of 0.1's releases, or None
            "non_private_releases": sum(1 for event in events if event.mechanism == MECHANISM_NON_PRIVATE),
            "n_events": len(events),
            "n_pending": sum(1 for event in events if event.outcome is None),
            "events": [event.as_dict() for event in events],
        }

    # -- releases migrated from fedcrm 0.1 ---------------------------------------------------------

    @property
    def _seeded_key(self) -> str:
        return f"{SEEDED_ACCEPTED_KEY}:{self.region}"

    def seeded_accepted(self) -> str | None:
        """The data owner's acceptance of this region's ``seeded`` releases (what it records), or None."""
        with self._connect_for_reading() as conn:
            return self._meta(conn, self._seeded_key)

    def record_seeded_accepted(self, record: str) -> None:
        """Count this region's ``seeded`` releases at their recorded σ from now on; once, never undone.

        A meta row, append-only like every row here, so the acceptance lives and travels with the events
        it qualifies. Only :func:`fedcrm.governance.seeded_releases.accept_seeded` calls this, after it
        wrote the decision to the region's audit log.
        """
        check_text("record", record)
        with self._connect() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (self._seeded_key, record))
