"""Evaluation answers are metered DP releases about a hold-out only the region knows (issue 15 §1).

On fedcrm 0.1 the server chose the hold-out fraction, membership was a public hash of (id, config
seed), and answers were exact: two queries at fractions a millionth apart differed by one customer, whose
label the difference gave away. Each test below failed there.
"""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from conftest import one_region

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import load_schema
from fedcrm.errors import PolicyError
from fedcrm.models import build_model, get_weights
from fedcrm.region import Region
from fedcrm.unlearning.shards import holdout_mask
from fedcrm.unlearning.tombstones import Tombstones


def _region(
    tmp_path: Path, *, policy: dict | None = None, overrides: dict | None = None, customers: int = 800
) -> tuple[ExperimentConfig, Region]:
    cfg, settings = one_region(tmp_path, customers=customers, overrides=overrides, policy=policy)
    return cfg, Region(settings)


def _weights(cfg: ExperimentConfig, region: Region) -> list[dict[str, np.ndarray]]:
    n = region.load(cfg, load_schema(cfg.schema_path)).x.shape[1]
    return [get_weights(build_model(cfg.model, n_features=n, seed=3))]


def test_the_hold_out_fraction_is_the_regions_and_membership_needs_its_secret(tmp_path: Path) -> None:
    cfg, region = _region(tmp_path, overrides={"evaluation.holdout_fraction": 0.200001})
    with pytest.raises(PolicyError, match="policy fixes holdout_fraction = 0.2"):
        region.check_request(cfg, load_schema(cfg.schema_path))
    ids = np.asarray([f"c{i}" for i in range(5000)], dtype=object)
    a = holdout_mask(ids, fraction=0.2, secret="a" * 64)
    b = holdout_mask(ids, fraction=0.2, secret="b" * 64)
    assert 0.17 < a.mean() < 0.23 and 0.17 < b.mean() < 0.23
    assert (a != b).mean() > 0.25  # another secret, another hold-out: nothing public decides it


def test_the_same_query_twice_gets_independent_noise_and_two_ledger_events(tmp_path: Path) -> None:
    cfg, region = _region(tmp_path, policy={"evaluations_per_day": 10})
    schema = load_schema(cfg.schema_path)
    first = region.evaluate(cfg, schema, constituents=_weights(cfg, region), run_id="r")
    second = region.evaluate(cfg, schema, constituents=_weights(cfg, region), run_id="r")
    diff = np.concatenate([first.hist_pos - second.hist_pos, first.hist_neg - second.hist_neg])
    # Independent N(0, (σ·2)²) per answer: the difference has std σ·2·√2 ≈ 8.5 per bin with the default σ = 3.
    assert 6.0 < float(np.std(diff)) < 11.5
    events = region.ledger.events()
    assert [(e.mechanism, e.population) for e in events] == [("gaussian", "holdout:200000/1000000")] * 2


def test_differencing_around_an_erasure_finds_noise_not_the_label(tmp_path: Path) -> None:
    """The attack of the issue: answer, erase one hold-out customer, answer again, read the label off the
    difference (positives' minus negatives' histogram). Exact answers give it every time; DP answers about
    half the time, like a coin."""
    cfg, region = _region(tmp_path, policy={"evaluations_per_day": 1000, "privacy_budget": 1e9})
    schema = load_schema(cfg.schema_path)
    data = region.load(cfg, schema)
    held = np.flatnonzero(data.holdout)
    weights = _weights(cfg, region)
    right = 0
    trials = 30
    for t in range(trials):
        victim = held[t]
        before = region.evaluate(cfg, schema, constituents=weights, run_id=f"attack-{t}")
        Tombstones(region.settings.state_dir).add([str(data.ids[victim])])
        after = Region(region.settings).evaluate(cfg, schema, constituents=weights, run_id=f"attack-{t}")
        guess = float((before.hist_pos - after.hist_pos).sum() - (before.hist_neg - after.hist_neg).sum()) > 0
        right += guess == bool(data.y[victim])
    assert right <= 22  # a coin gets 15 ± 2.7; the exact answers of 0.1 got all 30


def test_a_region_gives_its_daily_allowance_of_answers_then_refusals(tmp_path: Path) -> None:
    cfg, region = _region(tmp_path, policy={"evaluations_per_day": 2})
    schema = load_schema(cfg.schema_path)
    for _ in range(2):
        region.evaluate(cfg, schema, constituents=_weights(cfg, region), run_id="r")
    for run_id in ("r", "another"):  # the run id is the server's: a new one is no new allowance (issue 23)
        with pytest.raises(PolicyError, match="evaluations_per_day"):
            region.evaluate(cfg, schema, constituents=_weights(cfg, region), run_id=run_id)
    assert len(region.ledger.events()) == 2  # the refused answers recorded nothing


def test_hold_out_answers_compose_like_dp_accounting_and_apart_from_training(tmp_path: Path) -> None:
    cfg, region = _region(tmp_path, policy={"evaluations_per_day": 10})
    schema = load_schema(cfg.schema_path)
    region.train(cfg, schema, weights=_weights(cfg, region)[0], shard=0, round_=1, run_id="r")
    for _ in range(3):
        region.evaluate(cfg, schema, constituents=_weights(cfg, region), run_id="r")
    events = region.ledger.events()
    acct = dp_accounting.rdp.RdpAccountant(
        [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
    )
    for e in events[1:]:
        acct.compose(dp_accounting.GaussianDpEvent(e.noise_multiplier))
    holdout = region.ledger.epsilon_of_holdout(delta=region.delta, accountant="rdp")
    assert holdout == pytest.approx(acct.get_epsilon(region.delta), rel=0.01)
    train = region.ledger.epsilon_of_shard(shard=0, shards=1, delta=region.delta, accountant="rdp")
    # Parallel composition: the hold-out is never trained on, the training customers are never evaluated.
    assert region.ledger.epsilon(delta=region.delta, accountant="rdp") == pytest.approx(max(train, holdout))


def test_the_auc_noise_estimate_grows_with_the_noise_and_matches_repeated_answers() -> None:
    from fedcrm.evaluation.metrics import ScoreSummary, auc_from_histograms
    from fedcrm.fl.strategy import auc_noise_sd

    rng = np.random.default_rng(1)
    labels = rng.random(3000) < 0.3
    scores = np.clip(0.3 + 0.25 * (labels - 0.3) + 0.2 * rng.standard_normal(3000), 0.001, 0.999)
    exact = ScoreSummary.of(scores=scores, labels=labels, bins=24, logit_range=6.0)
    small, large = auc_noise_sd(exact, noise_std=1.0), auc_noise_sd(exact, noise_std=20.0)
    assert small < 0.01 < large
    # The estimate agrees with the spread of AUCs of independently noised answers (what it stands for).
    spread = np.std(
        [
            auc_from_histograms(exact.hist_pos + rng.normal(0, 20.0, 24), exact.hist_neg + rng.normal(0, 20.0, 24))
            for _ in range(300)
        ]
    )
    assert large == pytest.approx(spread, rel=0.25)
