"""One-pass delivery to simulated nodes gives what Flower's per-node loop gives, in one scan of the store."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from fedcrm.fl.delivery import FLOWER_DELIVERY, next_messages, use_one_pass_delivery


@dataclass
class FakeStore:
    """The parts of Flower's InMemoryLinkState that delivery reads, counting the validity checks."""

    message_ins_store: dict[str, Message]
    lock: threading.RLock = field(default_factory=threading.RLock)
    checks: int = 0

    def _check_stored_messages(self, message_ids: set[str]) -> None:
        self.checks += len(message_ids)


def _store(dsts: list[int]) -> FakeStore:
    msgs = {}
    for i, dst in enumerate(dsts):
        m = Message(content=RecordDict(), dst_node_id=dst, message_type="train")
        m.metadata.__dict__["_message_id"] = f"m{i}"
        msgs[f"m{i}"] = m
    return FakeStore(message_ins_store=msgs)


@pytest.mark.usefixtures("task_identity")
def test_one_pass_delivers_what_flowers_per_node_loop_delivers_sweep_after_sweep() -> None:
    dsts = [3, 1, 3, 2, 1, 3, 9]  # node 9 is not one of the simulation's nodes
    nodes = {1: 0, 2: 1, 3: 2}
    ours, flowers = _store(dsts), _store(dsts)
    for _ in range(4):  # until both stores are drained: node 3 has three messages
        got = sorted(m.metadata.message_id for m in next_messages(ours, nodes))  # type: ignore[arg-type]
        ref = sorted(
            m.metadata.message_id for n in nodes for m in InMemoryLinkState.get_message_ins(flowers, node_id=n, limit=1)
        )  # type: ignore[arg-type]
        assert got == ref
    assert all(m.metadata.delivered_at for k, m in ours.message_ins_store.items() if k != "m6")
    assert ours.message_ins_store["m6"].metadata.delivered_at == ""


@pytest.mark.usefixtures("task_identity")
def test_one_pass_checks_each_stored_message_once_per_sweep_not_once_per_node() -> None:
    nodes = {n: n for n in range(200)}
    ours, flowers = _store(list(nodes)), _store(list(nodes))
    next_messages(ours, nodes)  # type: ignore[arg-type]
    for n in nodes:
        InMemoryLinkState.get_message_ins(flowers, node_id=n, limit=1)  # type: ignore[arg-type]
    assert ours.checks == 200
    assert flowers.checks > 200 * 100  # Flower's loop: every node scans the store (until its own message)


def test_flowers_delivery_is_restored_after_the_simulation() -> None:
    with use_one_pass_delivery():
        assert vce_api.add_messages_to_queue is not FLOWER_DELIVERY
    assert vce_api.add_messages_to_queue is FLOWER_DELIVERY
