"""Releases migrated from fedcrm 0.1 against the server that wrote their config (issue 23, item 7).

fedcrm 0.1 derived each release's noise from the run's config: the server could regenerate the noise
and subtract it, so those releases (marked ``seeded`` by the migration) are worth ε = ∞ against it.
They count so until the data owner runs an audited ``fedcrm budget --accept-seeded``; the migration
says that 0.1's evaluation answers were exact and never recorded.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import one_region, write_layout_1_ledger
from typer.testing import CliRunner

from fedcrm.data.schema import load_schema
from fedcrm.errors import PrivacyBudgetError
from fedcrm.governance.audit_log import AuditLog
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.region import Region

# The migration's warning is what one test checks; the others open migrated ledgers for what follows.
pytestmark = pytest.mark.filterwarnings("ignore:.*this ledger was written by fedcrm 0.1:UserWarning")

OLD_RELEASE = GaussianRelease(1.0, 0.01, 200)  # what each 0.1 round recorded


def _layout_1_ledger(state_dir: Path, *, regions: tuple[str, ...] = ("eu",), rounds: int = 2) -> None:
    """Two 0.1 rounds per region, shard 0, each ``OLD_RELEASE`` at δ = 1e-6."""
    sigma, q, steps = OLD_RELEASE.noise_multiplier, OLD_RELEASE.sample_rate, OLD_RELEASE.steps
    rows = [(region, r) for region in regions for r in range(rounds)]
    write_layout_1_ledger(
        state_dir, [(i, region, 0, r, sigma, q, steps, 1e-6) for i, (region, r) in enumerate(rows, start=1)]
    )


def _train_once(tmp_path: Path) -> tuple[Region, Path]:
    cfg, settings = one_region(tmp_path, customers=400)
    _layout_1_ledger(settings.state_dir)
    region = Region(settings)
    schema = load_schema(cfg.schema_path)
    weights = get_weights(build_model(cfg.model, n_features=region.load(cfg, schema).x.shape[1], seed=0))
    region.train(cfg, schema, weights=weights, shard=0, round_=1, run_id="new")
    return region, settings.state_dir


def test_a_migrated_seeded_release_counts_as_infinite_epsilon_and_stops_training(tmp_path: Path) -> None:
    with pytest.raises(PrivacyBudgetError, match="--accept-seeded"):
        _train_once(tmp_path)
    ledger = PrivacyLedger.open(tmp_path / "state" / "eu", region="eu")
    assert ledger.epsilon(delta=1e-6, accountant="rdp") == float("inf")
    assert [e.noise for e in ledger.events()] == ["seeded", "seeded"]  # nothing new was released


def test_the_migration_says_that_0_1_evaluation_answers_were_exact_and_unrecorded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _layout_1_ledger(state / "eu")
    with pytest.warns(UserWarning, match="evaluation answers were exact .* never recorded"):
        PrivacyLedger.open(state / "eu", region="eu")
    from fedcrm.cli import app

    shown = CliRunner().invoke(app, ["budget", "--region", "eu", "--state", str(state)], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "evaluation answers were exact (no noise) and were never recorded" in text
    assert "ε spent inf" in text


def test_accept_seeded_is_audited_durable_and_once(tmp_path: Path) -> None:
    from fedcrm.cli import app

    state = tmp_path / "state"
    _layout_1_ledger(state / "eu")
    PrivacyLedger.open(state / "eu", region="eu")
    args = ["budget", "--region", "eu", "--state", str(state)]
    accepted = CliRunner().invoke(app, [*args, "--accept-seeded", "--operator", "dpo-alice", "--json"])
    assert accepted.exit_code == 0, accepted.output
    assert "dpo-alice" in json.loads(accepted.output)["seeded_accepted"]
    entries = [e for e in AuditLog.open(state / "eu" / "audit.log").entries() if e.action == "seeded_accepted"]
    assert [(e.actor, e.details["event_ids"]) for e in entries] == [("dpo-alice", [1, 2])]
    # Durable: a fresh ledger object composes the old releases at their recorded σ.
    ledger = PrivacyLedger.open(state / "eu", region="eu")
    assert ledger.epsilon(delta=1e-6, accountant="rdp") == pytest.approx(
        epsilon([OLD_RELEASE, OLD_RELEASE], delta=1e-6, accountant="rdp")
    )
    assert "dpo-alice" in str(ledger.seeded_accepted())
    # Once: a second acceptance is refused, and the marker cannot be removed.
    again = CliRunner().invoke(app, [*args, "--accept-seeded"])
    assert again.exit_code != 0 and "already accepted" in " ".join(again.output.split())
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), sqlite3.connect(ledger.path) as c:
        c.execute("DELETE FROM meta WHERE key LIKE 'seeded_accepted%'")
    shown = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert shown["epsilon_spent"] < float("inf") and shown["seeded_accepted"]


def test_accepting_one_regions_seeded_releases_leaves_another_regions_infinite(tmp_path: Path) -> None:
    state = tmp_path / "state" / "shared"  # one ledger file may hold several regions
    _layout_1_ledger(state, regions=("eu", "us"))
    eu, us = PrivacyLedger.open(state, region="eu"), PrivacyLedger.open(state, region="us")
    assert eu.epsilon(delta=1e-6, accountant="rdp") == us.epsilon(delta=1e-6, accountant="rdp") == float("inf")
    from fedcrm.governance.seeded_releases import accept_seeded

    accept_seeded(state_dir=state, region="eu", actor="dpo")
    assert eu.epsilon(delta=1e-6, accountant="rdp") < float("inf")
    assert us.epsilon(delta=1e-6, accountant="rdp") == float("inf") and us.seeded_accepted() is None
