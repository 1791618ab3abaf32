"""The deployment ServerApp's grid looks for replies every 0.1 s (+1 ms per missing reply), not every 3 s.

The grid it wraps here is a stand-in for the SuperLink (replies appear at a given look); the real one is
exercised by every deployment test, and the latency it saves is in docs/benchmarks.md §5.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcrm.fl import grid as grid_module
from fedcrm.fl.grid import MAX_POLL_S, PromptGrid, reply_poll_s

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps messages with the process's run


class Link(Grid):
    """Messages to nodes 1..n; node k's reply appears at look number ``answers_at[k]``."""

    def __init__(self, answers_at: dict[int, int]) -> None:
        self.answers_at, self.looks, self.sent = answers_at, 0, {}

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, *a, **k) -> Message:  # type: ignore[no-untyped-def]  # noqa: ANN002, ANN003
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.answers_at)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            self.sent[f"m{m.metadata.dst_node_id}"] = m.metadata.dst_node_id
            ids.append(f"m{m.metadata.dst_node_id}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.looks += 1
        out = []
        for mid in message_ids:
            if self.answers_at[self.sent[mid]] == self.looks:
                reply = Message(RecordDict(), dst_node_id=0, message_type="query")
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not fall back to the wrapped grid's 3 s loop")


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", slept.append)
    return slept


def test_every_reply_comes_back_after_short_looks(sleeps: list[float]) -> None:
    link = Link({1: 1, 2: 4, 3: 6})
    replies = PromptGrid(link).send_and_receive(_messages([1, 2, 3]), timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert link.looks == 6  # it stops at the look that brought the last reply
    # between looks: 0.1 s + 1 ms per reply still missing (two, then one), never Flower's 3 s
    assert sleeps == pytest.approx([reply_poll_s(2)] * 3 + [reply_poll_s(1)] * 2)
    assert sleeps[0] == pytest.approx(0.102)


def test_a_timeout_returns_what_came_and_stops_looking(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(grid_module.time, "time", lambda: now[0])
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: (sleeps.append(s), now.__setitem__(0, now[0] + s)))
    link = Link({1: 1, 2: 10**9})  # node 2 never answers
    replies = PromptGrid(link).send_and_receive(_messages([1, 2]), timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert sum(sleeps) == pytest.approx(1.0)  # waited the whole timeout, in short looks, not past it
    assert link.looks == 10  # 0.101 s per look with one reply missing


def test_the_interval_grows_with_the_replies_missing_up_to_flowers() -> None:
    assert reply_poll_s(0) == pytest.approx(0.1)
    assert reply_poll_s(1000) == pytest.approx(1.1)
    assert reply_poll_s(10**6) == MAX_POLL_S == 3.0
