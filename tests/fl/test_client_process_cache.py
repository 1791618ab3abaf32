"""The client process keeps each region's encoded table between messages in a real simulation.

Regression test: the cache once lived in the ClientApp object, which the simulation pickles to its
actors with every message, so it was empty at every message and each one re-read its table. A
test-only client mod records, inside the actor, how many regions the process had cached when each
message arrived.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import write_tiny_config
from flwr.app import Context, Message

from fedcrm.config import load_config
from fedcrm.fl.simulation import run_simulated


def record_cache_size(log: Path) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        from fedcrm.region import PROCESS_CACHE

        with open(log, "a") as f:
            f.write(f"{os.getpid()} {msg.metadata.message_type} {len(PROCESS_CACHE._entries)}\n")
        return call_next(msg, context)

    return mod


def test_each_client_process_reuses_its_cached_region_data(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, overrides={"training.rounds": 3}))
    log = tmp_path / "cache.log"
    run_simulated(
        cfg,
        run_dir=tmp_path / "run",
        state_root=tmp_path / "state",
        report=lambda s: None,
        client_mods=[record_cache_size(log)],
    )
    seen: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, _, size = line.split()
        seen.setdefault(pid, []).append(int(size))
    # Every process starts empty and, after its first message, never finds its cache empty again.
    for sizes in seen.values():
        assert sizes[0] == 0
        assert len(sizes) > 2 and all(n >= 1 for n in sizes[1:]), sizes
