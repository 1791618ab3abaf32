"""The outgoing check at the regions and the server's screening of updates."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcrm import wire
from fedcrm.fl.client import BlockedReply, check_outgoing, status
from fedcrm.fl.strategy import check_update


def test_declared_reply_passes_the_outgoing_check() -> None:
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord.from_array_dict({"w": Array(np.zeros(3, dtype=np.float32))}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 100, wire.EPSILON: 1.0}),
            wire.STATUS: status("eu", wire.OUTCOME_OK),
        }
    )
    assert check_outgoing(content) is content


def test_a_regions_typed_results_map_each_figure_to_one_wire_key() -> None:
    """Region returns dataclasses; the ClientApp alone names their wire keys, each figure under its own key."""
    from dataclasses import fields

    from fedcrm.fl.client import profile_metrics, release_metrics
    from fedcrm.region import RegionProfile, TrainRelease

    profile = RegionProfile(
        declared_customers=1200.0, smallest_shard=300.0, budget=8.0, delta=1e-6, min_customers=50, features=17
    )
    release = TrainRelease(weights={"w": np.zeros(2)}, weight=1200.0, noise_multiplier=1.1, epsilon=0.4, budget=8.0)
    for result, metrics in ((profile, profile_metrics(profile)), (release, release_metrics(release))):
        assert set(metrics) <= wire.METRIC_KEYS
        figures = [float(getattr(result, f.name)) for f in fields(result) if f.name != "weights"]
        assert sorted(metrics.values()) == sorted(figures)  # every figure sent, and nothing else
    assert profile_metrics(profile)[wire.DECLARED_TRAIN] == 1200.0
    assert release_metrics(release)[wire.NUM_EXAMPLES] == 1200.0  # Flower's FedAvg weighs by this key
    check_outgoing(RecordDict({wire.METRICS: MetricRecord(profile_metrics(profile))}))


@pytest.mark.parametrize(
    "content",
    [
        RecordDict({"customers": ConfigRecord({"ids": "a,b,c"})}),
        RecordDict({wire.METRICS: MetricRecord({"score-of-customer-7": 0.93})}),
        RecordDict({wire.STATUS: ConfigRecord({wire.REGION: "eu", "row": "7590-VHVEG,Female,0"})}),
        RecordDict({wire.METRICS: ArrayRecord.from_array_dict({"x": Array(np.zeros(2, dtype=np.float32))})}),
    ],
)
def test_anything_outside_the_wire_vocabulary_is_blocked(content: RecordDict) -> None:
    with pytest.raises(BlockedReply):
        check_outgoing(content)


@pytest.mark.usefixtures("task_identity")
def test_a_blocked_reply_is_not_sent_and_is_logged(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from conftest import plan_message, write_tiny_config
    from flwr.app import Context, RecordDict

    from fedcrm.config import load_config
    from fedcrm.fl import client as client_module

    def leaky(region, msg):  # type: ignore[no-untyped-def]
        return RecordDict({wire.METRICS: MetricRecord({"customer-7-score": 0.9})})

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 50}))
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"region": "eu", "data-path": str(cfg.regions["eu"]), "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config={},
    )
    with caplog.at_level(logging.ERROR, logger="fedcrm.region"):
        reply = client_module.answer(leaky, plan_message(cfg), ctx)  # the handler ignores the message
    assert set(reply.keys()) == {wire.STATUS}
    assert reply[wire.STATUS][wire.OUTCOME] == wire.OUTCOME_FAILED
    assert "customer-7-score" in caplog.text


def _update(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord.from_array_dict({k: Array(v) for k, v in arrays.items()})


EXPECTED = {"w": (2, 3), "b": (2,)}


def test_well_formed_update_is_accepted() -> None:
    assert check_update(_update(w=np.zeros((2, 3), np.float32), b=np.ones(2, np.float32)), expected=EXPECTED) is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_update(w=np.full((2, 3), np.nan, np.float32), b=np.ones(2, np.float32)), "NaN"),
        (_update(w=np.full((2, 3), np.inf, np.float32), b=np.ones(2, np.float32)), "NaN or infinite"),
        (_update(w=np.zeros((3, 2), np.float32), b=np.ones(2, np.float32)), "shape"),
        (_update(w=np.zeros((2, 3), np.float64), b=np.ones(2, np.float32)), "dtype"),
        (_update(w=np.zeros((2, 3), np.float32)), "missing"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(update: ArrayRecord, reason: str) -> None:
    why = check_update(update, expected=EXPECTED)
    assert why is not None and reason in why
