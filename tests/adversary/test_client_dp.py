"""Client-level DP against the server that runs it (issue 23, item 6).

Removing one customer moves their region's clipped update from one point of the C-ball to another, up
to 2C, while the server's noise is σ·C/m on the average of m updates: the customer sees noise
multiplier σ/2. fedcrm 0.1 charged σ (README's setting, σ = 3 over 10 rounds at δ = 1e-6: 5.54 charged,
12.45 true). And the server receives every clipped update before it noises the sum, so against the
server client-level DP without secure aggregation is ε = ∞: the budget, the summary and the report say so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dp_accounting
import pytest
from conftest import one_region
from flwr.app import ConfigRecord
from typer.testing import CliRunner

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import load_schema
from fedcrm.errors import PrivacyBudgetError
from fedcrm.fl.server import Preflight, ServedEvaluation, privacy_warnings, summarise
from fedcrm.models import build_model, get_weights
from fedcrm.node_settings import NodeSettings
from fedcrm.region import Region
from fedcrm.report.card import model_card
from fedcrm.report.reading import RunView
from fedcrm.runs import RunDir

SIGMA = 3.0  # the server's noise multiplier in README's client-level DP row
ROUNDS = 10
DELTA = 1e-6  # the default policy's δ


def _client_dp_region(tmp_path: Path) -> tuple[ExperimentConfig, NodeSettings]:
    return one_region(
        tmp_path,
        customers=400,
        overrides={
            "privacy.mode": "client_dp",
            "privacy.client_noise_multiplier": SIGMA,
            "privacy.clipping_norm": 0.05,
            "training.rounds": ROUNDS,
        },
        policy={"required_privacy": "any", "privacy_budget": 100.0, "delta": DELTA},
    )


def _train_rounds(cfg: ExperimentConfig, settings: NodeSettings, rounds: int) -> Region:
    """``rounds`` client-level DP rounds, asked of the region as the server's train handler asks."""
    region = Region(settings)
    schema = load_schema(cfg.schema_path)
    n = region.load(cfg, schema).x.shape[1]
    weights = get_weights(build_model(cfg.model, n_features=n, seed=0))
    for r in range(1, rounds + 1):
        weights = region.train(cfg, schema, weights=weights, shard=0, round_=r, run_id="client-dp").weights
    return region


def _dp_accounting_epsilon(noise_multiplier: float, *, rounds: int, delta: float) -> float:
    """Google's accountant, independent of Opacus: a Gaussian mechanism (q = 1) composed ``rounds`` times."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
    acct = dp_accounting.rdp.RdpAccountant(orders)
    acct.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(acct.get_epsilon(delta))


def test_ten_client_dp_rounds_charge_each_customer_at_sigma_over_two(tmp_path: Path) -> None:
    cfg, settings = _client_dp_region(tmp_path)
    region = _train_rounds(cfg, settings, ROUNDS)
    charged = region.ledger.epsilon(delta=region.delta, accountant="rdp")
    true = _dp_accounting_epsilon(SIGMA / 2, rounds=ROUNDS, delta=DELTA)
    assert true == pytest.approx(12.45, abs=0.01)  # README's setting, per customer
    assert charged == pytest.approx(true, rel=1e-3)
    # What 0.1 charged (the sensitivity of a whole region, C): 5.54, under half the customer's true ε.
    assert _dp_accounting_epsilon(SIGMA, rounds=ROUNDS, delta=DELTA) == pytest.approx(5.54, abs=0.01)
    assert all(e.release.noise_multiplier == SIGMA / 2 for e in region.ledger.events())  # type: ignore[union-attr]


def test_client_dp_budget_refuses_the_round_its_true_sensitivity_puts_over_budget(tmp_path: Path) -> None:
    """A budget of 6 admits all ten rounds at the charged-at-σ 5.54; at σ/2 the region stops early."""
    cfg, settings = _client_dp_region(tmp_path)
    settings.policy_path.write_text(  # type: ignore[union-attr]
        json.dumps({"required_privacy": "any", "privacy_budget": 6.0, "delta": DELTA})
    )
    with pytest.raises(PrivacyBudgetError):
        _train_rounds(cfg, settings, ROUNDS)
    region = Region(settings)
    assert region.ledger.epsilon(delta=DELTA, accountant="rdp") <= 6.0
    assert len(region.ledger.events()) < ROUNDS


def test_budget_command_shows_infinity_against_the_server_for_client_dp(tmp_path: Path) -> None:
    from fedcrm.cli import app

    cfg, settings = _client_dp_region(tmp_path)
    _train_rounds(cfg, settings, 1)
    state, policy = str(settings.state_dir.parent), str(settings.policy_path)
    args = ["budget", "--region", "eu", "--state", state, "--policy", policy]
    shown = CliRunner().invoke(app, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    s = json.loads(shown.output)
    assert s["epsilon_spent"] < 100 and s["epsilon_against_server"] == float("inf")
    text = CliRunner().invoke(app, args, terminal_width=200)
    assert text.exit_code == 0, text.output
    assert "against the server: ∞ (client-level DP without secure aggregation)" in text.output


def test_run_summary_and_report_show_infinity_against_the_server_for_client_dp(tmp_path: Path) -> None:
    cfg, settings = _client_dp_region(tmp_path)
    region = _train_rounds(cfg, settings, 1)
    epsilon = region.ledger.epsilon(delta=DELTA, accountant="rdp")
    run = RunDir(path=tmp_path / "run", config=cfg)
    run.path.mkdir()
    pre = Preflight(
        run=run,
        run_id="client-dp",
        started=time.time(),
        plan=ConfigRecord({}),
        schema=load_schema(cfg.schema_path),
        feature_names=[],
        nodes=[1],
        excluded=set(),
        described={"eu": {"epsilon": epsilon, "delta": DELTA, "budget": 100.0}},
        refused={},
        node_regions={1: "eu"},
        events={"refused": {}, "failed": {}, "rejected": {}},
        notes=privacy_warnings(cfg, regions=1),
    )
    served = ServedEvaluation(per_region={}, pooled={"auc": 0.7}, suppressed={}, trust={})
    summary = summarise(cfg, pre, served, model_version=1, report=lambda _: None)
    assert summary.privacy["eu"]["against_server"] == "∞ (client-level DP without secure aggregation)"
    assert any("against the server and its operator is ∞" in w for w in summary.warnings)
    card = model_card(RunView(path=run.path, config={}, summary=summary, rows=[]))
    assert "| eu | " in card and "∞ (client-level DP without secure aggregation) |" in card
    assert "the server clips" not in card  # the regions clip
