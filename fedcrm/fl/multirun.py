"""Several independent experiments (sweep cells) in one Flower Simulation Engine.

Starting the engine costs seconds (Ray, one actor process per virtual node, torch and Opacus imported in
each); a round of a small tabular model costs about one. A sweep therefore runs many cells inside one
ServerApp ``main``, calling :func:`run_federation` once per cell, so that the start-up is paid once.

This is safe because nothing of a run lives in the engine: the ClientApp builds its :class:`Region`
afresh from the node config for every message, and reads the whole plan from the message. Only the node
config differs between cells (each cell has its own data files and its own state folder, hence its own
privacy ledger). A client mod picks the cell's node config from the run id in the plan message
(``<experiment name>-<uuid>``): every cell has a distinct experiment name. Ray's start-up alone cannot be
shared across ``run_simulation`` calls: Flower's Ray backend calls ``ray.shutdown()`` when a run ends.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedcrm import wire
from fedcrm.config import ExperimentConfig
from fedcrm.errors import FederationError
from fedcrm.fl.client import build_client_app
from fedcrm.fl.delivery import use_one_pass_delivery
from fedcrm.fl.registry import NodeRegistry
from fedcrm.fl.server import Report, run_federation
from fedcrm.fl.simulation import NodeConfigs, simulated_nodes
from fedcrm.run_summary import RunSummary

log = logging.getLogger("fedcrm.sweep")


@dataclass(frozen=True)
class SimulatedRun:
    """One experiment to run in a shared engine: its config, run folder and state root."""

    cfg: ExperimentConfig
    run_dir: Path
    state_root: Path


Outcome = RunSummary | BaseException
OnDone = Callable[[SimulatedRun, Outcome], None]


def _experiment_of(msg: Message) -> str:
    config = msg.content.get(wire.CONFIG)
    run_id = str(config.get(wire.RUN_ID, "")) if config is not None else ""  # type: ignore[union-attr]
    return run_id.rsplit("-", 1)[0]


def cell_node_config(
    tables: dict[str, NodeConfigs], *, registries: dict[str, NodeRegistry] | None = None
) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """A client mod: the node config of the experiment named in the message's run id.

    With ``registries`` (experiment -> its run's node registry), it records which region it assigned to
    this node id, as :func:`fedcrm.fl.simulation.simulated_node_config` does.

    Keys another experiment set and this one lacks (a policy file) are removed: the node's context
    lives on between messages, and one cell's policy must not leak into the next.
    """
    keys = {k for nodes in tables.values() for node in nodes.values() for k in node}

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        name = _experiment_of(msg)
        if name not in tables:
            raise FederationError(f"simulated node: no node config for experiment `{name}`")
        pid = int(context.node_config["partition-id"])
        registry = (registries or {}).get(name)
        if registry is not None and registry.region_of(context.node_id) is None:
            registry.record(node_id=context.node_id, region=tables[name][pid]["region"])
        for key in keys - set(tables[name][pid]):
            context.node_config.pop(key, None)
        context.node_config.update(tables[name][pid])
        return call_next(msg, context)

    return mod


def run_many_simulated(
    runs: Sequence[SimulatedRun],
    *,
    report: Report = print,
    on_done: OnDone | None = None,
    ray_address: str | None = None,
) -> list[Outcome]:
    """Run every experiment in one engine, in order; one outcome (summary or exception) per run.

    All runs must have the same number of regions (one virtual node per region). A failing run is
    returned as its exception and the next one starts; ``on_done`` is called after each run.
    ``ray_address``: run on that running Ray cluster (see :func:`fedcrm.fl.simulation.run_simulated`).
    """
    from flwr.simulation import run_simulation

    from fedcrm.fl.simulation import _quiet_flower, _stop_ray, ray_init_args

    if not runs:
        return []
    sizes = {len(r.cfg.regions) for r in runs}
    if len(sizes) != 1:
        raise FederationError(f"runs sharing one engine need the same number of regions, got {sorted(sizes)}")
    names = [r.cfg.name for r in runs]
    if len(set(names)) != len(names):
        raise FederationError("runs sharing one engine need distinct experiment names")
    tables = {r.cfg.name: simulated_nodes(r.cfg, state_root=r.state_root) for r in runs}
    n_nodes = sizes.pop()
    registries = {r.cfg.name: NodeRegistry(r.run_dir / ".flwr" / "node-registry") for r in runs}
    for registry in registries.values():
        if registry.directory.exists():
            shutil.rmtree(registry.directory)  # node ids are this engine's
    home = runs[0].run_dir.parent / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ["FLWR_HOME"] = str(home)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _quiet_flower()
    outcomes: list[Outcome] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for r in runs:
            outcome: Outcome
            try:
                outcome = run_federation(grid, r.cfg, run_dir=r.run_dir, report=report, registry=registries[r.cfg.name])
            except Exception as e:  # one cell's failure is recorded; the sweep goes on
                log.warning("run %s failed: %s", r.cfg.name, e)
                outcome = e
            outcomes.append(outcome)
            if on_done is not None:
                on_done(r, outcome)

    client_app = build_client_app(mods=[cell_node_config(tables, registries=registries)])
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": ray_init_args(n_nodes, processes=None, ray_address=ray_address),
    }
    with use_one_pass_delivery():
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=n_nodes, backend_config=backend_config
        )
    _stop_ray()
    # Runs the engine never reached (it failed to start) are reported as such.
    for r in runs[len(outcomes) :]:
        outcome = FederationError("the simulation engine stopped before this run started")
        outcomes.append(outcome)
        if on_done is not None:
            on_done(r, outcome)
    return outcomes
