"""The server's grid in deployment, looking for the regions' replies promptly.

Flower 1.42's ``HttpGrid.send_and_receive`` (the ServerApp's link to the SuperLink) looks for replies
once right after pushing the messages, then every 3 s: the regions' replies are never there at the
first look, so every message phase of a run (pre-flight, each round's training, the evaluation) lasted
at least 3 s, however fast the regions answered. :class:`PromptGrid` wraps the grid it is given and does
the same push-then-pull with a short interval: 0.1 s (Flower's in-memory grid) plus 1 ms per reply still
outstanding, so a federation of hundreds of regions is not asked more often than it can answer, capped
at Flower's 3 s. Everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["PromptGrid", "reply_poll_s"]

FIRST_POLL_S = 0.1
POLL_S_PER_OUTSTANDING = 0.001
MAX_POLL_S = 3.0  # Flower's HttpGrid


def reply_poll_s(outstanding: int) -> float:
    """Seconds until the next look for replies while ``outstanding`` are still missing."""
    return min(MAX_POLL_S, FIRST_POLL_S + POLL_S_PER_OUTSTANDING * outstanding)


class PromptGrid(Grid):
    """``grid``, with :meth:`send_and_receive` looking for replies every :func:`reply_poll_s`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` s passed (as Flower's)."""
        outstanding = set(self.grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.grid.pull_messages(outstanding))
            replies.extend(got)
            outstanding.difference_update(m.metadata.reply_to_message_id for m in got)
            if not outstanding:
                break
            wait = reply_poll_s(len(outstanding))
            time.sleep(wait if timeout is None else max(0.0, min(wait, end - time.time())))
        return replies
