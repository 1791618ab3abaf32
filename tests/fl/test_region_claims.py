"""A reply is counted under the region its node was registered for, never under the one it claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.fl.registry import NodeRegistry


@pytest.mark.usefixtures("task_identity")
def test_the_guard_rejects_a_reply_claiming_another_region(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedcrm.fl.codec import to_record
    from fedcrm.fl.strategy import GuardedStrategy, RoundEvents

    registry = NodeRegistry(tmp_path / "registry")
    registry.record(node_id=11, region="eu")
    registry.record(node_id=22, region="us")
    seen: list[RoundEvents] = []
    guard = GuardedStrategy(
        FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1),
        min_regions=1,
        excluded_nodes=set(),
        on_round=lambda rnd, ev, per_region, pooled: seen.append(ev),
        registry=registry,
    )

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [11, 22]

    arrays = to_record({"w": np.zeros((2,), dtype=np.float32)})
    sent = {m.metadata.dst_node_id: m for m in guard.configure_train(1, arrays, ConfigRecord({}), Grid())}  # type: ignore[arg-type]

    def reply(node: int, claimed: str, value: float) -> Message:
        return Message(
            content=RecordDict(
                {
                    wire.ARRAYS: to_record({"w": np.full((2,), value, dtype=np.float32)}),
                    wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 50.0, wire.EPSILON: 0.1}),
                    wire.STATUS: ConfigRecord({wire.REGION: claimed, wire.OUTCOME: wire.OUTCOME_OK}),
                }
            ),
            reply_to=sent[node],
        )

    # Node 22 (registered for us) answers as eu: were it believed, its update would stand for eu's.
    aggregated, _ = guard.aggregate_train(1, [reply(11, "eu", 1.0), reply(22, "eu", 100.0)])
    ev = guard.events[1]
    assert set(ev.train) == {"eu"}
    assert ev.rejected == {
        "us": "reply claims region `eu`, but node 22 is registered for `us`: rejected, nothing of it counted"
    }
    assert aggregated is not None and np.allclose(aggregated["w"].numpy(), 1.0)  # only eu's update


@pytest.mark.usefixtures("task_identity")
def test_a_node_never_registered_is_rejected_by_node_id(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedcrm.fl.strategy import screen_claims

    registry = NodeRegistry(tmp_path / "registry")
    registry.record(node_id=11, region="eu")
    msg = Message(
        content=RecordDict({wire.STATUS: ConfigRecord({wire.REGION: "eu", wire.OUTCOME: "ok"})}),
        dst_node_id=33,
        message_type="query",
    )
    msg.metadata._src_node_id = 33  # a reply as it arrives from node 33
    kept, rejected = screen_claims([msg], registry)
    assert kept == [] and list(rejected) == ["node-33"] and "not in the node registry" in rejected["node-33"]
    assert screen_claims([msg], None) == ([msg], {})  # no registry: claims are taken (run_federation warns)


def test_a_registry_keeps_one_node_per_region_and_never_moves_a_node(tmp_path: Path) -> None:
    from fedcrm.errors import ConfigError

    registry = NodeRegistry(tmp_path / "registry")
    registry.record(node_id=1, region="eu")
    registry.record(node_id=2, region="eu")  # eu's key was replaced: its old node no longer speaks for it
    assert registry.regions() == {2: "eu"}
    with pytest.raises(ConfigError, match="already registered for region `eu`"):
        registry.record(node_id=2, region="us")


def test_in_simulation_a_region_answering_as_another_is_rejected_every_round(tmp_path: Path) -> None:
    """Old code counted us's replies as eu's (its metrics and ε under eu's name); now they are rejected."""
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.governance.audit_log import verify
    from fedcrm.runs import read_metrics

    def impostor(msg, context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if context.node_config["region"] == "us" and wire.STATUS in reply.content:
            reply.content[wire.STATUS][wire.REGION] = "eu"
        return reply

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 400, "us": 400}))
    summary = run_simulated(
        cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None, client_mods=[impostor]
    )
    reason = summary.events["rejected"]["us"]
    assert "claims region `eu`" in reason and "registered for `us`" in reason
    assert "us" not in summary.regions and set(summary.final_metrics_by_region) <= {"eu"}
    assert not any("no node registry" in w for w in summary.warnings)
    # The pre-flight already shut us out, so no round trained with it (nor counted it as eu).
    for row in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert set(row["epsilon"]) == {"eu"}
    # summary.json anchors the server's audit log as the run found it.
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert verify(tmp_path / "run" / "audit.log", expect_head=on_disk["audit_head"]).ok
