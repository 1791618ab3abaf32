"""The region's privacy ledger: durable, append-only, composed over the whole history, per shard."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import write_layout_1_ledger

from fedcrm.errors import PrivacyBudgetError, StorageError
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger

DELTA = 1e-5
ROUND_RELEASE = GaussianRelease(1.0, 0.01, 200)


def _record_run(
    ledger: PrivacyLedger,
    *,
    run_id: str,
    rounds: int,
    shard: int = 0,
    shards: int | None = None,
    release: GaussianRelease = ROUND_RELEASE,
) -> list[int]:
    ids = []
    for r in range(rounds):
        event_id = ledger.record_release(
            shard=shard,
            shards=shards or max(shard + 1, 1),
            purpose="churn",
            run_id=run_id,
            round=r,
            release=release,
            delta=DELTA,
        )
        ledger.mark_outcome(event_id, "sent")
        ids.append(event_id)
    return ids


def test_open_creates_the_file_in_wal_mode(tmp_path: Path) -> None:
    PrivacyLedger.open(tmp_path / "state", region="eu")
    path = tmp_path / "state" / LEDGER_FILENAME
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_events_persist_across_reopen(tmp_path: Path) -> None:
    first = PrivacyLedger.open(tmp_path, region="eu")
    event_id = first.record_release(
        shard=0, purpose="churn", run_id="run-1", round=3, release=ROUND_RELEASE, delta=DELTA, note="hi"
    )
    first.mark_outcome(event_id, "sent")

    (event,) = PrivacyLedger.open(tmp_path, region="eu").events()
    assert (event.id, event.region, event.run_id, event.round, event.note) == (
        event_id,
        "eu",
        "run-1",
        3,
        "hi",
    )
    assert event.release == ROUND_RELEASE
    assert event.mechanism == "dp_sgd"
    assert event.outcome == "sent" and event.status == "sent"
    assert event.time.endswith("+00:00")


def test_a_second_run_continues_the_spend_of_the_first(tmp_path: Path) -> None:
    _record_run(PrivacyLedger.open(tmp_path, region="eu"), run_id="run-1", rounds=3)
    after_one = PrivacyLedger.open(tmp_path, region="eu").epsilon(delta=DELTA, accountant="rdp")

    _record_run(PrivacyLedger.open(tmp_path, region="eu"), run_id="run-2", rounds=2)
    after_two = PrivacyLedger.open(tmp_path, region="eu").epsilon(delta=DELTA, accountant="rdp")

    assert after_one == pytest.approx(epsilon([ROUND_RELEASE] * 3, delta=DELTA, accountant="rdp"))
    assert after_two == pytest.approx(epsilon([ROUND_RELEASE] * 5, delta=DELTA, accountant="rdp"))
    assert after_two > after_one


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET noise_multiplier = 100.0",
        "DELETE FROM events",
        "UPDATE outcomes SET outcome = 'not_sent'",
        "DELETE FROM outcomes",
        "DELETE FROM meta",
        "INSERT OR REPLACE INTO events (id, time, region, shard, purpose, run_id, round, mechanism, "
        "noise_multiplier, sample_rate, steps, delta, note) "
        "VALUES (1, 't', 'eu', 0, 'churn', 'r', 0, 'dp_sgd', 100.0, 0.01, 1, 1e-5, '')",
    ],
)
def test_rows_cannot_be_changed_or_deleted(tmp_path: Path, statement: str) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="run-1", rounds=1)
    before = ledger.events()
    with sqlite3.connect(ledger.path) as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(statement)
    assert ledger.events() == before


@pytest.mark.parametrize("outcome", [None, "not_sent"])
def test_pending_and_unsent_releases_still_count(tmp_path: Path, outcome: str | None) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    event_id = ledger.record_release(
        shard=0, purpose="churn", run_id="run-1", round=0, release=ROUND_RELEASE, delta=DELTA
    )
    if outcome is not None:
        ledger.mark_outcome(event_id, outcome, reason="server unreachable")
    (event,) = ledger.events()
    assert event.status == (outcome or "pending")
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(
        epsilon([ROUND_RELEASE], delta=DELTA, accountant="rdp")
    )
    assert ledger.epsilon(delta=DELTA, accountant="rdp") > 0
    assert [e.release for e in ledger.events(0)] == [ROUND_RELEASE]
    assert ledger.check_budget(
        budget=100.0, delta=DELTA, accountant="rdp", shard=0, next_release=ROUND_RELEASE
    ) == pytest.approx(epsilon([ROUND_RELEASE] * 2, delta=DELTA, accountant="rdp"))


def test_an_outcome_is_recorded_once_and_only_for_a_known_release(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    (event_id,) = _record_run(ledger, run_id="run-1", rounds=1)
    with pytest.raises(PrivacyBudgetError, match="already has an outcome"):
        ledger.mark_outcome(event_id, "not_sent")
    with pytest.raises(PrivacyBudgetError, match="no release with id 999"):
        ledger.mark_outcome(999, "sent")
    with pytest.raises(ValueError, match="outcome must be"):
        ledger.mark_outcome(event_id, "lost")
    assert ledger.events()[0].outcome == "sent"


def test_check_budget_returns_the_spend_after_the_release(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="run-1", rounds=2)
    after = ledger.check_budget(budget=100.0, delta=DELTA, accountant="rdp", shard=0, next_release=ROUND_RELEASE)
    assert after == pytest.approx(epsilon([ROUND_RELEASE] * 3, delta=DELTA, accountant="rdp"))


def test_budget_refusal_names_the_numbers_and_records_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="run-1", rounds=2, shard=2)
    spent = epsilon([ROUND_RELEASE] * 2, delta=DELTA, accountant="rdp")
    would_be = epsilon([ROUND_RELEASE] * 3, delta=DELTA, accountant="rdp")
    budget = (spent + would_be) / 2
    before = ledger.events()

    with pytest.raises(PrivacyBudgetError) as refused:
        ledger.check_budget(budget=budget, delta=DELTA, accountant="rdp", shard=2, shards=3, next_release=ROUND_RELEASE)

    message = str(refused.value)
    assert message.startswith(f"region eu: this round would bring ε to {would_be:.4g} on shard 2 of 3")
    assert f"over the budget {budget:.4g}" in message
    assert f"spent so far {spent:.4g}" in message
    assert "noise" in message  # says what to do
    assert PrivacyLedger.open(tmp_path, region="eu").events() == before


def test_shards_compose_in_parallel_so_region_epsilon_is_the_max(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="run-1", rounds=2, shard=0, shards=2)
    _record_run(ledger, run_id="run-1", rounds=3, shard=1, shards=2)

    by_shard = ledger.epsilon_by_shard(shards=2, delta=DELTA, accountant="rdp")
    two = epsilon([ROUND_RELEASE] * 2, delta=DELTA, accountant="rdp")
    three = epsilon([ROUND_RELEASE] * 3, delta=DELTA, accountant="rdp")
    assert by_shard == pytest.approx({0: two, 1: three})
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(three)
    # Not the sequential composition of all five releases, nor the sum of the shards.
    assert ledger.epsilon(delta=DELTA, accountant="rdp") < epsilon([ROUND_RELEASE] * 5, delta=DELTA, accountant="rdp")
    assert [e.release for e in ledger.events(0)] == [ROUND_RELEASE] * 2
    assert len(ledger.events(1)) == 3


def test_regions_sharing_a_file_do_not_see_each_others_spend(tmp_path: Path) -> None:
    _record_run(PrivacyLedger.open(tmp_path, region="eu"), run_id="run-1", rounds=2)
    us = PrivacyLedger.open(tmp_path, region="us")
    assert us.events() == []
    assert us.epsilon(delta=DELTA, accountant="rdp") == 0.0


def test_query_delta_is_used_whatever_delta_the_events_were_recorded_with(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    ledger.record_release(shard=0, purpose="churn", run_id="a", round=0, release=ROUND_RELEASE, delta=1e-3)
    ledger.record_release(shard=0, purpose="churn", run_id="b", round=0, release=ROUND_RELEASE, delta=1e-7)
    assert ledger.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(
        epsilon([ROUND_RELEASE] * 2, delta=1e-5, accountant="rdp")
    )


def test_summary_is_json_ready_and_consistent(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="run-1", rounds=2, shard=0)
    ledger.record_release(
        shard=1, shards=2, purpose="churn", run_id="run-1", round=0, release=ROUND_RELEASE, delta=DELTA
    )

    summary = json.loads(json.dumps(ledger.summary(delta=DELTA, accountant="rdp", budget=5.0)))
    spent = ledger.epsilon(delta=DELTA, accountant="rdp")
    assert summary["region"] == "eu"
    assert summary["epsilon_spent"] == pytest.approx(spent)
    assert summary["remaining"] == pytest.approx(5.0 - spent)
    assert set(summary["epsilon_by_shard"]) == {"1", "2"}  # the partitions used: S = 1 and S = 2
    assert set(summary["epsilon_by_shard"]["2"]) == {"0", "1"}
    assert summary["releases_by_noise"] == {"secure": 3}
    assert summary["n_events"] == 3 and summary["n_pending"] == 1
    assert [e["status"] for e in summary["events"]] == ["sent", "sent", "pending"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shard": -1}, "shard must be an integer >= 0"),
        ({"round": -1}, "round must be an integer >= 0"),
        ({"run_id": ""}, "run_id must be a non-empty string"),
        ({"delta": 0.0}, "delta must be in"),
    ],
)
def test_invalid_release_records_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    args = {
        "shard": 0,
        "purpose": "churn",
        "run_id": "r",
        "round": 0,
        "release": ROUND_RELEASE,
        "delta": DELTA,
    }
    with pytest.raises(ValueError, match=message):
        ledger.record_release(**{**args, **kwargs})
    assert ledger.events() == []


def test_a_file_that_is_not_sqlite_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    path.write_bytes(b"this is not a database, it was overwritten by a log rotation" * 100)
    with pytest.raises(StorageError, match=f"{path}.*restore it from a backup"):
        PrivacyLedger.open(tmp_path, region="eu")


def test_a_sqlite_file_of_another_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StorageError, match="missing tables: events, meta, outcomes"):
        PrivacyLedger.open(tmp_path, region="eu")


def test_a_ledger_with_wrong_columns_or_no_triggers_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "a", region="eu")
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("DROP TRIGGER events_no_update")
    with pytest.raises(StorageError, match="append-only triggers are missing"):
        PrivacyLedger.open(tmp_path / "a", region="eu")

    path = tmp_path / "b" / LEDGER_FILENAME
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE meta (key TEXT, value TEXT); CREATE TABLE outcomes (event_id INTEGER);"
            "CREATE TABLE events (id INTEGER, epsilon REAL);"
        )
    with pytest.raises(StorageError, match="table events has columns id, epsilon"):
        PrivacyLedger.open(tmp_path / "b", region="eu")


# -- partitions: the server picks S per run, the ledger composes over every partition used ------------


def test_a_run_at_s1_then_one_at_s4_charges_each_customer_both(tmp_path: Path) -> None:
    """Issue point 4: old code keyed composition by shard index alone, so after an S = 1 run an S = 4
    run saw "shard 2 spent 0" and the region reported the S = 4 run's ε while the customers of shard 0
    (read by both runs) had spent both."""
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    first = GaussianRelease(2.0, 0.1, 100)
    _record_run(ledger, run_id="s1", rounds=1, shard=0, shards=1, release=first)
    for k in range(4):
        _record_run(ledger, run_id="s4", rounds=1, shard=k, shards=4)
    both = epsilon([first, ROUND_RELEASE], delta=DELTA, accountant="rdp")
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(both)
    by_shard = ledger.epsilon_by_shard(shards=4, delta=DELTA, accountant="rdp")
    assert by_shard == pytest.approx({k: both for k in range(4)})
    # ... and the budget check of a further S = 4 release on shard 2 includes the S = 1 run.
    after = ledger.check_budget(
        budget=100.0, delta=DELTA, accountant="rdp", shard=2, shards=4, next_release=ROUND_RELEASE
    )
    assert after == pytest.approx(epsilon([first, ROUND_RELEASE, ROUND_RELEASE], delta=DELTA, accountant="rdp"))
    with pytest.raises(PrivacyBudgetError):
        ledger.check_budget(
            budget=both * 1.01, delta=DELTA, accountant="rdp", shard=2, shards=4, next_release=ROUND_RELEASE
        )


def test_cells_of_two_partitions_compose_only_the_shards_that_meet(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    heavy = GaussianRelease(0.8, 0.1, 300)
    _record_run(ledger, run_id="a", rounds=2, shard=1, shards=2, release=heavy)  # S = 2: shard 1 twice
    _record_run(ledger, run_id="b", rounds=1, shard=0, shards=3)  # S = 3: shard 0 once, shard 2 three times
    _record_run(ledger, run_id="c", rounds=3, shard=2, shards=3)
    worst = epsilon([heavy, heavy, *[ROUND_RELEASE] * 3], delta=DELTA, accountant="rdp")
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(worst)
    by_s3 = ledger.epsilon_by_shard(shards=3, delta=DELTA, accountant="rdp")
    assert by_s3[1] == pytest.approx(epsilon([heavy, heavy], delta=DELTA, accountant="rdp"))  # no S = 3 release
    assert by_s3[0] == pytest.approx(epsilon([heavy, heavy, ROUND_RELEASE], delta=DELTA, accountant="rdp"))
    assert by_s3[2] == pytest.approx(worst)


def test_a_non_private_release_makes_epsilon_infinite_and_blocks_dp_budget_checks(tmp_path: Path) -> None:
    from fedcrm.privacy.accountant import NonPrivateRelease

    ledger = PrivacyLedger.open(tmp_path, region="eu")
    ledger.record_release(shard=0, purpose="churn", run_id="plain", round=0, release=NonPrivateRelease(), delta=DELTA)
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == float("inf")
    (event,) = ledger.events()
    assert event.mechanism == "non_private"
    with pytest.raises(PrivacyBudgetError, match="without DP"):
        ledger.check_budget(budget=10.0, delta=DELTA, accountant="rdp", shard=0, next_release=ROUND_RELEASE)


def test_a_layout_1_ledger_is_migrated_with_its_events_charged_to_everyone(tmp_path: Path) -> None:
    path = write_layout_1_ledger(tmp_path, [(1, "eu", 3, 0, 1.0, 0.01, 200, 1e-5)])
    with pytest.warns(UserWarning, match="evaluation answers were exact"):
        ledger = PrivacyLedger.open(tmp_path, region="eu")
    (event,) = ledger.events()
    assert (event.shard, event.shards, event.noise, event.status) == (3, None, "seeded", "sent")
    # Its noise was predictable: ε = ∞ until the data owner accepts it (issue 23; tests/adversary/test_migration.py).
    assert ledger.epsilon_of_shard(shard=0, shards=8, delta=DELTA, accountant="rdp") == float("inf")
    ledger.record_seeded_accepted("accepted in this test")
    # Its partition is unknown, so every customer is charged, under any S.
    assert ledger.epsilon_of_shard(shard=0, shards=8, delta=DELTA, accountant="rdp") == pytest.approx(
        epsilon([ROUND_RELEASE], delta=DELTA, accountant="rdp")
    )
    _record_run(ledger, run_id="new", rounds=1)  # and the migrated file takes new releases, append-only still
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), sqlite3.connect(path) as c:
        c.execute("DELETE FROM events")
    assert len(PrivacyLedger.open(tmp_path, region="eu").events()) == 2


def test_a_layout_2_ledger_gets_a_nonce_column_and_keeps_its_events_and_their_keys(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    _record_run(ledger, run_id="old", rounds=1)
    old_nonce = f"{ledger.ledger_id}:eu:1"  # how 0.2's layout 2 made every key: no random part
    conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)  # back to layout 2, as an earlier 0.2 build wrote it
    triggers = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    conn.executescript(
        "".join(f"DROP TRIGGER {name};" for name in triggers)
        + "ALTER TABLE events DROP COLUMN nonce; DELETE FROM meta WHERE key = 'schema_version';"
        "INSERT INTO meta VALUES ('schema_version', '2');"
    )
    conn.close()
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    (event,) = ledger.events()
    assert (event.run_id, event.nonce) == ("old", None)
    assert ledger.nonce(event.id) == old_nonce  # an old release keeps the key it was drawn with
    _record_run(ledger, run_id="new", rounds=1)
    new = ledger.events()[-1]
    assert new.nonce and ledger.nonce(new.id) == f"{ledger.ledger_id}:eu:{new.id}:{new.nonce}"
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), sqlite3.connect(tmp_path / LEDGER_FILENAME) as c:
        c.execute("DELETE FROM events")


def test_reproducible_nonces_are_unique_per_ledger_and_event(tmp_path: Path) -> None:
    a = PrivacyLedger.open(tmp_path / "a", region="eu")
    b = PrivacyLedger.open(tmp_path / "b", region="eu")
    assert a.nonce(1) != a.nonce(2) and a.nonce(1) != b.nonce(1)
    assert PrivacyLedger.open(tmp_path / "a", region="eu").nonce(1) == a.nonce(1)
