"""Message delivery to the simulated nodes in one pass over Flower's message store, not one per node.

Flower 1.42's Simulation Engine hands messages to its virtual nodes from a thread
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) that, every 0.1 s, asks the in-memory
link state for each node in turn for its next message; each ask scans (and validates) every stored
message. With N nodes and a round's N messages in the store, a sweep costs N² checks, under the state's
lock and the driver's GIL: at 1,000 tenants a sweep takes seconds, during which replies cannot be stored.

:func:`deliver_in_one_pass` is the same loop with the same result, one message per node per sweep, the
oldest first, expired or foreign messages dropped by Flower's own check, in one scan of the store per
sweep. :func:`use_one_pass_delivery` puts it in place for the simulation this process runs; for a link
state other than Flower's in-memory one (whose fields it reads) it keeps Flower's loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

SWEEP_S = 0.1  # Flower's own interval between sweeps


def next_messages(state: InMemoryLinkState, nodes: set[int] | dict[int, Any]) -> list[Message]:
    """The oldest undelivered message of every node in ``nodes``, marked delivered (one scan)."""
    picked: dict[int, Message] = {}
    with state.lock:
        for msg_id in list(state.message_ins_store.keys()):
            state._check_stored_messages({msg_id})  # Flower's expiry / federation check, as it does per node
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in nodes and dst not in picked:
                picked[dst] = msg
        delivered_at = now().isoformat()
        for msg in picked.values():
            msg.metadata.delivered_at = delivered_at
    return list(picked.values())


def deliver_in_one_pass(
    state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, Any], f_stop: threading.Event
) -> None:
    """Drop-in for Flower's ``add_messages_to_queue`` (same arguments, same thread)."""
    if not isinstance(state, InMemoryLinkState):
        FLOWER_DELIVERY(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for msg in next_messages(state, nodes_mapping):
            queue.put(msg)
        f_stop.wait(SWEEP_S)


FLOWER_DELIVERY: Callable[..., None] = vce_api.add_messages_to_queue


@contextmanager
def use_one_pass_delivery() -> Iterator[None]:
    """Within the block, simulations started in this process deliver with :func:`deliver_in_one_pass`.

    Flower's ``run_api`` starts its delivery thread with the module's ``add_messages_to_queue``, looked
    up when the simulation starts; it is restored afterwards.
    """
    vce_api.add_messages_to_queue = deliver_in_one_pass  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = FLOWER_DELIVERY  # type: ignore[assignment]
