"""The DP guarantee holds against the party that writes the config and receives the updates.

Each test here failed on fedcrm 0.1 (issue 14): noise the server could regenerate, retrains sharing
noise, δ and S chosen by the server, non-private training by default, exact counts and losses on the
wire, mis-scaled client-level DP.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import one_region, write_tiny_config

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.data.schema import load_schema
from fedcrm.errors import ConfigError, PolicyError, PrivacyBudgetError
from fedcrm.fl.client import profile_metrics, release_metrics
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.region import NodeSettings, Region

Weights = dict[str, np.ndarray]


def _setup(
    tmp_path: Path, *, overrides: dict | None = None, policy: dict | None = None, customers: int = 600
) -> tuple[ExperimentConfig, NodeSettings]:
    return one_region(tmp_path, customers=customers, overrides=overrides, policy=policy)


def _start(cfg: ExperimentConfig, region: Region) -> Weights:
    n = region.load(cfg, load_schema(cfg.schema_path)).x.shape[1]
    return get_weights(build_model(cfg.model, n_features=n, seed=0))


def _train(
    cfg: ExperimentConfig,
    settings: NodeSettings,
    *,
    round_: int = 1,
    shard: int = 0,
    run_id: str = "run-a",
    start: Weights | None = None,
) -> tuple[Weights, dict[str, float]]:
    """The update and the metrics of its training reply, as the region's ClientApp sends them."""
    region = Region(settings)
    release = region.train(
        cfg,
        load_schema(cfg.schema_path),
        weights=start or _start(cfg, region),
        shard=shard,
        round_=round_,
        run_id=run_id,
    )
    return release.weights, release_metrics(release)


def _distance(a: Weights, b: Weights) -> float:
    return float(np.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)))


# -- 1. the noise and the sample are the region's secret ------------------------------------------


def test_same_config_and_state_give_fresh_noise_and_nearby_tables_differ_by_the_noise(tmp_path: Path) -> None:
    """On 0.1 the seed was sha256(config seed, region, shard, round): the same round twice gave the same
    update bit for bit, and two tables differing in three customers gave updates 2 % of the noise apart,
    so the server could subtract the noise it regenerated."""
    cfg, settings = _setup(tmp_path, overrides={"training.optimizer": "sgd", "training.learning_rate": 0.5})
    start = _start(cfg, Region(settings))
    a1, _ = _train(cfg, settings, start=start)
    a2, _ = _train(cfg, settings, start=start)  # same config, same state, same round
    noise_apart = _distance(a1, a2)
    assert noise_apart > 0

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "state", other)
    table = pd.read_csv(settings.data_path)
    table.loc[:2, "churned"] = 1 - table.loc[:2, "churned"]  # three customers' labels flipped
    changed = tmp_path / "changed.csv"
    table.to_csv(changed, index=False)
    b, _ = _train(cfg, replace(settings, data_path=changed, state_dir=other / "eu"), start=start)
    ratio = _distance(a1, b) / noise_apart
    assert 0.5 < ratio < 2.0, ratio  # the difference between the tables is hidden in noise of its own size


# -- 2. retrains: fresh randomness, and exact against a from-scratch run with the same keys ----------


def test_reproducible_mode_needs_the_policy_and_never_reuses_a_key(tmp_path: Path) -> None:
    cfg, settings = _setup(tmp_path, overrides={"privacy.noise": "reproducible"})
    with pytest.raises(PolicyError, match="allow_reproducible_noise"):
        _train(cfg, settings)
    cfg, settings = _setup(
        tmp_path, overrides={"privacy.noise": "reproducible"}, policy={"allow_reproducible_noise": True}
    )
    start = _start(cfg, Region(settings))
    fork = tmp_path / "fork"
    shutil.copytree(tmp_path / "state", fork)  # the region's state before the release
    first, _ = _train(cfg, settings, start=start)
    again, _ = _train(cfg, settings, start=start)  # the same round asked again (e.g. a retrain): a new key
    assert _distance(first, again) > 0
    # Replaying from the recorded state needs the recorded keys, named by the data owner (a copy of the
    # state alone is a restored backup: it draws a fresh key, tests/adversary/test_server_chosen_windows.py).
    PrivacyLedger.open(fork / "eu", region="eu").replay(Region(settings).ledger)
    replayed, _ = _train(
        cfg,
        replace(settings, state_dir=fork / "eu"),
        start=start,
    )
    for k in first:  # from the same recorded state, the region regenerates its own release exactly
        np.testing.assert_array_equal(first[k], replayed[k])
    events = Region(settings).ledger.events()
    assert [e.noise for e in events] == ["reproducible", "reproducible"]


# -- 3. δ is the region's --------------------------------------------------------------------------


def test_a_config_cannot_choose_delta(tmp_path: Path) -> None:
    """On 0.1 the ledger composed at the config's δ: δ = 0.5 read ε ≈ 0 and made runs unlimited."""
    cfg, settings = _setup(tmp_path, overrides={"privacy.delta": 0.5})
    with pytest.raises(PolicyError, match=r"policy fixes δ = 1e-06.*privacy.delta = 0.5"):
        _train(cfg, settings)
    cfg, settings = _setup(tmp_path)
    _, metrics = _train(cfg, settings)
    (event,) = Region(settings).ledger.events()
    assert event.delta == 1e-6
    assert metrics["epsilon"] == pytest.approx(epsilon([event.release], delta=1e-6, accountant="rdp"))


def test_a_policy_delta_not_below_one_over_n_is_refused(tmp_path: Path) -> None:
    cfg, settings = _setup(tmp_path, policy={"delta": 5e-4}, customers=6000)  # > 2,000 training customers
    with pytest.raises(PolicyError, match="not below 1/N"):
        _train(cfg, settings)


# -- 4. the shard count the server picks cannot hide earlier spend ---------------------------------


def test_an_s4_run_after_an_s1_run_sees_and_enforces_both(tmp_path: Path) -> None:
    cfg, settings = _setup(tmp_path, customers=1200)
    _train(cfg, settings, run_id="s1")  # one round at S = 1 reads every customer
    s1 = Region(settings).ledger.events()[0].release
    cfg4 = cfg.with_overrides({"unlearning.shards": 4})
    _, metrics = _train(cfg4, settings, run_id="s4", shard=2)
    s4 = Region(settings).ledger.events()[1].release
    assert metrics["epsilon"] == pytest.approx(epsilon([s1, s4], delta=1e-6, accountant="rdp"))
    assert metrics["epsilon"] > epsilon([s4], delta=1e-6, accountant="rdp")  # 0.1 reported this figure
    budget = epsilon([s1, s4], delta=1e-6, accountant="rdp") * 1.05
    _, settings_tight = _setup(tmp_path, policy={"privacy_budget": budget}, customers=1200)
    _train(cfg4, settings_tight, run_id="s4", shard=1, round_=1)  # shard 1 had the S = 1 run only: fits
    with pytest.raises(PrivacyBudgetError, match="shard 2 of 4"):  # shard 2 would pass the budget
        _train(cfg4, settings_tight, run_id="s4", shard=2, round_=2)


# -- 5. no policy file: DP required ----------------------------------------------------------------


def test_without_a_policy_a_region_refuses_to_train_without_dp(tmp_path: Path) -> None:
    cfg, settings = _setup(tmp_path, overrides={"privacy.mode": "none", "privacy.target_epsilon": None})
    with pytest.raises(PolicyError, match="allow_non_private"):
        _train(cfg, settings)
    assert Region(settings).ledger.events() == []


def test_non_private_training_allowed_by_policy_is_recorded_as_infinite_epsilon(tmp_path: Path) -> None:
    cfg, settings = _setup(
        tmp_path,
        overrides={"privacy.mode": "none", "privacy.target_epsilon": None},
        policy={"allow_non_private": True, "required_privacy": "any"},
    )
    _, metrics = _train(cfg, settings)
    assert metrics["epsilon"] == float("inf")
    (event,) = Region(settings).ledger.events()
    assert event.mechanism == "non_private"
    dp_cfg, _ = _setup(tmp_path)
    with pytest.raises(PrivacyBudgetError, match="without DP"):  # no DP claim holds for them any more
        _train(dp_cfg, settings, round_=2)


# -- 6. replies carry public figures only ----------------------------------------------------------


def test_training_replies_and_preflight_carry_no_exact_counts_or_losses(tmp_path: Path) -> None:
    from fedcrm import wire

    cfg, settings = _setup(tmp_path, customers=1234)
    _, metrics = _train(cfg, settings)
    assert "train-loss" not in metrics and "train-loss" not in wire.METRIC_KEYS
    region = Region(settings)
    data = region.load(cfg, load_schema(cfg.schema_path))
    exact = data.counts["train"]
    # 2 significant digits, never finer than the policy's public step (100) at any size (0.2.0).
    assert metrics["num-examples"] == region.policy.declared_size(exact) == round(exact / 100) * 100
    described = profile_metrics(region.describe(cfg, load_schema(cfg.schema_path)))
    assert set(described) == {"train", "smallest-shard", "budget", "delta", "min-customers", "n-features"}
    assert described["train"] == metrics["num-examples"]
    # One erasure moves the public figure only when it crosses a rounding boundary.
    from fedcrm.unlearning.tombstones import Tombstones

    Tombstones(settings.state_dir).add([str(data.ids[~data.holdout][0])])
    after = Region(settings).describe(cfg, load_schema(cfg.schema_path)).declared_customers
    assert after == region.policy.declared_size(exact - 1)
    # ... which equals the figure before except where the count sits on a rounding boundary (1 in 10).
    hidden = [region.policy.declared_size(n) == region.policy.declared_size(n - 1) for n in range(1000, 2000)]
    assert sum(hidden) >= 900
    # The exact counts are in the region's own audit log.
    assert any(e.action == "preflight" and e.details["counts"]["train"] == exact for e in region.audit.entries())


def test_q_and_steps_are_planned_from_the_declared_size(tmp_path: Path) -> None:
    cfg, settings = _setup(tmp_path, customers=1234)
    _train(cfg, settings)
    region = Region(settings)
    declared = region.policy.declared_size(region.load(cfg, load_schema(cfg.schema_path)).counts["train"])
    (event,) = region.ledger.events()
    assert event.sample_rate == cfg.training.batch_size / declared


# -- 7. client-level DP ----------------------------------------------------------------------------


def test_client_dp_clips_at_the_region_and_weights_regions_uniformly(tmp_path: Path) -> None:
    cfg, settings = _setup(
        tmp_path,
        overrides={
            "privacy.mode": "client_dp",
            "privacy.clipping_norm": 0.01,
            "privacy.client_noise_multiplier": 2.0,
            "training.learning_rate": 0.5,
        },
        policy={"required_privacy": "any"},
    )
    start = _start(cfg, Region(settings))
    new, metrics = _train(cfg, settings, start=start)
    assert _distance(new, start) <= 0.01 * (1 + 1e-5)
    assert metrics["num-examples"] == 1.0
    (event,) = Region(settings).ledger.events()
    # One customer moves the clipped update by up to 2C: the customer sees σ/2 (issue 23; was σ).
    assert event.release == GaussianRelease(cfg.privacy.client_noise_multiplier / 2, 1.0, 1)


def test_client_dp_refuses_robust_aggregation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client_dp needs federation.strategy fedavg"):
        load_config(
            write_tiny_config(tmp_path, overrides={"privacy.mode": "client_dp", "federation.strategy": "fedmedian"})
        )


def test_client_dp_noise_is_scaled_to_the_updates_actually_aggregated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's wrapper adds σ·C/m with m the regions configured; with fewer replies each region's
    sensitivity C/m_actual is larger than the noise assumes. fedcrm scales to the replies aggregated."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedcrm import wire
    from fedcrm.fl.codec import to_record
    from fedcrm.fl.strategy import NoiseForAggregated

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a SuperLink process sets
        monkeypatch.setattr(TaskIdentity, name, value)
    sigma, clip = 1.0, 2.0
    strategy = NoiseForAggregated(FedAvg(), noise_multiplier=sigma, clipping_norm=clip, num_sampled_clients=10)
    zeros = {"w": np.zeros((4000,), dtype=np.float32)}
    strategy.current_arrays = to_record(zeros)

    def reply(node: int) -> Message:
        sent = Message(
            content=RecordDict({wire.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
        )
        return Message(
            content=RecordDict({wire.ARRAYS: to_record(zeros), wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1.0})}),
            reply_to=sent,
        )

    arrays, _ = strategy.aggregate_train(1, [reply(1), reply(2)])
    assert arrays is not None
    std = float(np.std(arrays["w"].numpy()))
    assert std == pytest.approx(sigma * clip / 2, rel=0.05)  # Flower's own: σ·C/10 = 0.2
