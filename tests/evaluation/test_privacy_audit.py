"""The one-run bound (Steinke, Nasr & Jagielski 2023) and the black-box audit on a served model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.synthetic import generate
from fedcrm.evaluation.privacy_audit import (
    bce,
    customer_canaries,
    epsilon_lower_bound,
    guess_counts,
    one_run_audit,
    p_value,
    verdict,
)
from fedcrm.models import build_model, predict_proba
from fedcrm.privacy.accountant import plan_noise_multiplier
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import DpSgd, sampling_plan, train_locally
from fedcrm.unlearning.shards import holdout_mask

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the bound --------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_pure_dp_bound_for_all_guesses_right_is_the_closed_form(r: int) -> None:
    # With δ = 0 and every one of r guesses right, p(ε) = (e^ε / (1 + e^ε))^r, so the largest rejected ε
    # at significance α is logit(α^(1/r)): 100 right guesses prove ε ≥ 3.49 at 95 %.
    alpha = 0.05
    q = alpha ** (1 / r)
    expected = math.log(q / (1 - q))
    got = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0, significance=alpha)
    assert got == pytest.approx(expected, abs=1e-9)
    if r == 100:
        assert got == pytest.approx(3.49, abs=0.005)


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side from exact binomial terms, summed by hand (no scipy)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, w) * q**w * (1 - q) ** (r - w) for w in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 100, 90, 1.5, 1e-5),
        (1000, 100, 99, 3.0, 1e-3),
        (200, 60, 40, 0.5, 1e-4),
        (50, 20, 20, 2.0, 0.0),
        (10_000, 150, 140, 2.2, 1e-6),
    ],
)
def test_p_value_matches_an_independent_computation_of_the_theorem(
    m: int, r: int, v: int, eps: float, delta: float
) -> None:
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(
        _reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


def test_the_delta_term_only_ever_weakens_the_bound() -> None:
    kw = {"canaries": 10_000, "guesses": 200, "correct": 196, "significance": 0.05}
    assert epsilon_lower_bound(**kw, delta=0.0) > epsilon_lower_bound(**kw, delta=1e-5) > 0


def test_bound_holds_at_95_percent_for_randomised_response_at_the_claimed_epsilon() -> None:
    # Randomised response at ε is ε-DP and makes every guess right with probability e^ε/(1+e^ε), the worst
    # case of the theorem: the test must reject the true ε in at most 5 % of runs (and, being tight for
    # pure DP, in not much less).
    rng = np.random.default_rng(0)
    eps, r, runs = 1.0, 400, 4000
    correct = rng.binomial(r, math.exp(eps) / (1 + math.exp(eps)), size=runs)
    p = np.array([p_value(canaries=r, guesses=r, correct=int(v), epsilon=eps, delta=0.0) for v in correct])
    rejected = float(np.mean(p <= 0.05))
    assert 0.02 < rejected <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_guessing_a_coin_gives_no_evidence_and_a_perfect_separation_gives_a_lot() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    coin = one_run_audit(rng.normal(size=2000), included, delta=DELTA)
    assert coin.epsilon_lower_bound == 0.0 and abs(coin.auc - 0.5) < 0.05
    assert verdict(coin.epsilon_lower_bound, claimed_epsilon=0.1) == "consistent"
    perfect = one_run_audit(included + rng.normal(scale=0.01, size=2000), included, delta=DELTA)
    assert perfect.epsilon_lower_bound > 4
    assert perfect.correct >= 0.99 * (perfect.guesses_in + perfect.guesses_out)
    assert perfect.hypotheses == len(guess_counts(2000))
    assert verdict(perfect.epsilon_lower_bound, claimed_epsilon=3.0) == "violation"
    assert verdict(perfect.epsilon_lower_bound, claimed_epsilon=None) == "no claim"


def test_a_memorising_models_losses_prove_a_leak_from_their_high_end_alone() -> None:
    # A model that memorised its members: every member's loss is near 0, as is that of most non-members
    # (easy customers); only non-members get a high loss (the 30 % it gets wrong). The low-loss end is a
    # coin between members and easy non-members; the high-loss end is all non-members.
    rng = np.random.default_rng(3)
    included = rng.random(240) < 0.5
    wrong = ~included & (rng.random(240) < 0.3)
    scores = -np.where(wrong, rng.exponential(2.0, 240) + 1.0, rng.exponential(0.01, 240))
    result = one_run_audit(scores, included, delta=DELTA)
    assert result.guesses_in == 0 and result.guesses_out > 0
    assert result.correct == result.guesses_out
    # The audit before 48399b6 (no k- alone guesses, its own 14) proves half as much: 0.59 against 1.20.
    old_grid = [(k_in, k_out) for k_in, k_out in guess_counts(240) if k_in > 0]
    without = one_run_audit(scores, included, delta=DELTA, hypotheses=old_grid).epsilon_lower_bound
    assert result.epsilon_lower_bound > 2 * without, (result.epsilon_lower_bound, without)


# -- black box: customers as canaries ----------------------------------------------------------------


def test_customer_canaries_are_members_with_probability_one_half() -> None:
    rng = np.random.default_rng(2)
    for f in (0.2, 0.7):
        holdout = rng.random(200_000) < f
        chosen = customer_canaries(holdout, holdout_fraction=f, rng=rng)
        assert np.mean(~holdout[chosen]) == pytest.approx(0.5, abs=0.005)
        assert chosen.mean() == pytest.approx(2 * min(f, 1 - f), abs=0.005)


def _region(tmp_path: Path, n: int, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    generate(regions=["eu"], customers=n, seed=0, out_dir=tmp_path)
    table = load_table(tmp_path / "eu.csv", SCHEMA)
    # A fixed secret, not a region's random one: the split (and so the audit's thresholds) stays reproducible.
    holdout = holdout_mask(table.ids, fraction=fraction, secret="audit-test")
    return FeatureEncoder(SCHEMA).encode(table), table.labels, holdout


def _black_box(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, holdout: np.ndarray, fraction: float):  # noqa: ANN202
    chosen = customer_canaries(holdout, holdout_fraction=fraction, rng=np.random.default_rng(3))
    losses = bce(predict_proba(model, x[chosen]), y[chosen])
    return one_run_audit(-losses, ~holdout[chosen], delta=DELTA)


def test_overfit_non_private_model_on_a_small_region_is_caught(tmp_path: Path) -> None:
    x, y, holdout = _region(tmp_path, 600, 0.5)
    model = build_model(ModelConfig(kind="mlp", hidden=(64, 64)), n_features=x.shape[1], seed=0)
    train_locally(
        model,
        x=x[~holdout],
        y=y[~holdout],
        training=TrainingConfig(local_epochs=150, batch_size=32, learning_rate=0.01),
        dp=None,
        randomness=ReleaseRandomness.public_seed(0),
    )
    r = _black_box(model, x, y, holdout, 0.5)
    assert r.canaries > 500 and r.auc > 0.65, r
    assert r.epsilon_lower_bound > 0.3, r  # a proven leak, at 95 % confidence
    assert verdict(r.epsilon_lower_bound, claimed_epsilon=0.1) == "violation"


def test_dp_model_lower_bound_stays_below_its_epsilon(tmp_path: Path) -> None:
    x, y, holdout = _region(tmp_path, 600, 0.5)
    n_train = int((~holdout).sum())
    training = TrainingConfig(local_epochs=15, batch_size=32, learning_rate=0.01)
    target = 1.0
    q, steps = sampling_plan(n=n_train, batch_size=training.batch_size, epochs=training.local_epochs)
    sigma = plan_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant="rdp")
    model = build_model(ModelConfig(kind="mlp", hidden=(64, 64)), n_features=x.shape[1], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_locally(
            model,
            x=x[~holdout],
            y=y[~holdout],
            training=training,
            dp=DpSgd(noise_multiplier=sigma, clipping_norm=1.0),
            randomness=ReleaseRandomness.secure(),
        )
    r = _black_box(model, x, y, holdout, 0.5)
    assert r.epsilon_lower_bound <= target
    assert verdict(r.epsilon_lower_bound, claimed_epsilon=target) == "consistent"
    assert r.auc < 0.6, r
