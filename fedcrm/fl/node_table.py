"""The simulation's node configs: what each region's data owner would set on a real SuperNode.

The client mod that applies them travels, pickled, to every ClientApp process with the ClientApp, and
each process imports the module the mod comes from: this one imports only what a region needs, not
the server's side (strategy, aggregation, reports; ~1 s per process), which :mod:`fedcrm.fl.simulation`
imports to drive the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Message

from fedcrm.config import ExperimentConfig
from fedcrm.durable import write_text_atomically
from fedcrm.fl.registry import NodeRegistry
from fedcrm.node_settings import REGION, region_settings

NodeConfigs = dict[int, dict[str, str]]


def simulated_nodes(cfg: ExperimentConfig, *, state_root: Path) -> NodeConfigs:
    """What each region's data owner would put in ``--node-config`` on a real SuperNode, by partition id."""
    return {i: s.node_config() for i, s in enumerate(region_settings(cfg, state_root=state_root).values())}


def write_node_table(nodes: NodeConfigs, *, state_root: Path) -> Path:
    """Keep the simulation's node configs in a file under the state root; return its path.

    The simulation pickles the ClientApp, mods and all, to its actors with every message: a mod holding
    every region's node config made each message as large as the federation (at 1,000 regions, a
    federation's worth of pickling per message, N² per round). The mod holds this path instead, and
    each ClientApp process reads the file once. The name is the content's hash, so the file never
    changes once written and runs sharing a state root never disturb each other. The state root is
    where the regions' ledgers go, so every node of a Ray cluster that runs ClientApps reaches it.
    """
    text = json.dumps({str(pid): node for pid, node in nodes.items()}, sort_keys=True)
    path = Path(state_root).resolve() / f".simulated-nodes-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, text, what="write the simulation's node configs")
    return path


@lru_cache(maxsize=4)
def _node_table(path: str) -> NodeConfigs:
    return {int(pid): node for pid, node in json.loads(Path(path).read_text(encoding="utf-8")).items()}


def simulated_node_config(
    node_table: Path, *, registry: NodeRegistry | None = None
) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """A client mod that sets the node config a real data owner would set, by partition id.

    ``node_table`` is :func:`write_node_table`'s file. With ``registry``, the mod also records which
    region it assigned to this node id, before the node answers: Flower's simulation picks node ids at
    random and tells the server only the ids, so the one that assigns the regions is the one that can
    register them.
    """
    table = str(node_table)

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        pid = int(context.node_config["partition-id"])
        node = _node_table(table)[pid]
        if registry is not None and registry.region_of(context.node_id) is None:
            registry.record(node_id=context.node_id, region=node[REGION])
        context.node_config.update(node)
        return call_next(msg, context)

    return mod
