"""Empirical privacy audit: an overfit non-private model leaks, a DP model stays below its ε."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from scipy.stats import binomtest

from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.synthetic import generate
from fedcrm.evaluation.privacy_audit import bce, clopper_pearson, loss_threshold_attack, verdict
from fedcrm.models import build_model, predict_proba
from fedcrm.privacy.accountant import plan_noise_multiplier
from fedcrm.training import DpSgd, sampling_plan, train_locally
from fedcrm.unlearning.shards import holdout_mask

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
DELTA = 1e-5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models train faster on one thread, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _region(tmp_path: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    generate(regions=["eu"], customers=n, seed=0, out_dir=tmp_path)
    table = load_table(tmp_path / "eu.csv", SCHEMA)
    return FeatureEncoder(SCHEMA).encode(table), table.labels, holdout_mask(table.ids, fraction=0.2, seed=0)


def _attack(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, holdout: np.ndarray):  # noqa: ANN202
    losses = bce(predict_proba(model, x), y)
    return loss_threshold_attack(losses[~holdout], losses[holdout], delta=DELTA)


@pytest.mark.parametrize(("k", "n"), [(0, 40), (3, 40), (37, 40), (40, 40), (120, 1600)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    alpha = 0.01
    lo, hi = clopper_pearson(k, n, alpha=alpha)
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-12)
    assert hi == pytest.approx(ref.high, abs=1e-12)


def test_identical_loss_distributions_give_no_evidence() -> None:
    rng = np.random.default_rng(0)
    r = loss_threshold_attack(rng.exponential(size=4000), rng.exponential(size=1000), delta=DELTA)
    assert abs(r.auc - 0.5) < 0.05
    assert r.epsilon_lower_bound == 0.0
    assert verdict(r, claimed_epsilon=0.1) == "consistent"


def test_overfit_non_private_model_on_a_small_region_leaks(tmp_path: Path) -> None:
    x, y, holdout = _region(tmp_path, 200)
    model = build_model(ModelConfig(kind="mlp", hidden=(64, 64)), n_features=x.shape[1], seed=0)
    train_locally(model, x=x[~holdout], y=y[~holdout],
                  training=TrainingConfig(local_epochs=150, batch_size=32, learning_rate=0.01), dp=None, seed=0)
    r = _attack(model, x, y, holdout)
    assert r.members > 120 and r.non_members > 25
    assert r.auc > 0.65, r
    assert r.advantage > 0.25, r
    assert r.epsilon_lower_bound > 0.2, r  # a proven leak, at 95% confidence
    # A claim of ε = 0.1 for this model would be refuted, loudly, by the CLI.
    assert verdict(r, claimed_epsilon=0.1) == "violation"
    assert verdict(r, claimed_epsilon=None) == "no claim"


def test_dp_model_empirical_lower_bound_stays_below_its_epsilon(tmp_path: Path) -> None:
    x, y, holdout = _region(tmp_path, 600)
    n_train = int((~holdout).sum())
    training = TrainingConfig(local_epochs=15, batch_size=32, learning_rate=0.01)
    target = 1.0
    q, steps = sampling_plan(n=n_train, batch_size=training.batch_size, epochs=training.local_epochs)
    sigma = plan_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant="rdp")
    model = build_model(ModelConfig(kind="mlp", hidden=(64, 64)), n_features=x.shape[1], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_locally(model, x=x[~holdout], y=y[~holdout], training=training,
                      dp=DpSgd(noise_multiplier=sigma, clipping_norm=1.0), seed=0)
    r = _attack(model, x, y, holdout)
    assert r.epsilon_lower_bound <= target
    assert verdict(r, claimed_epsilon=target) == "consistent"
    assert r.auc < 0.6, r
