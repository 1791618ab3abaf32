"""Running a federation on one machine with Flower's Simulation Engine (Ray), one virtual SuperNode
per region.

In simulation the machine plays every data owner: a client mod gives each virtual node the
node config its data owner would set on a real SuperNode (region, data file, state folder), looked
up by Flower's partition id. The ClientApp's own code is the deployed one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedcrm.config import ExperimentConfig
from fedcrm.fl.client import build_client_app
from fedcrm.fl.server import Report, run_federation

NodeConfigs = dict[int, dict[str, str]]


def simulated_nodes(cfg: ExperimentConfig, *, state_root: Path) -> NodeConfigs:
    """What each region's data owner would put in ``--node-config`` on a real SuperNode."""
    nodes: NodeConfigs = {}
    for i, (name, path) in enumerate(cfg.regions.items()):
        nodes[i] = {"region": name, "data-path": str(path), "state-dir": str((state_root / name).resolve())}
        if name in cfg.policies:
            nodes[i]["policy-path"] = str(cfg.policies[name])
    return nodes


def simulated_node_config(nodes: NodeConfigs) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """A client mod that sets the node config a real data owner would set, by partition id."""

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        pid = int(context.node_config["partition-id"])
        context.node_config.update(nodes[pid])
        return call_next(msg, context)

    return mod


def _quiet_flower() -> None:
    """Flower's per-round INFO lines and its notice that `run_simulation` is deprecated are not the user's
    concern here: fedcrm prints its own progress. Errors still show."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def run_simulated(
    cfg: ExperimentConfig,
    *,
    run_dir: Path,
    state_root: Path,
    report: Report = print,
    client_mods: Sequence[Callable[..., Message]] = (),
    **federation_kwargs: Any,
) -> dict[str, Any]:
    """Run the experiment in simulation; returns the run summary. Leaves no process behind.

    ``client_mods`` are extra Flower client mods (e.g. fault injection in tests), applied inside the
    node-config mod so they see the region's settings.
    """
    from flwr.simulation import run_simulation

    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _quiet_flower()
    nodes = simulated_nodes(cfg, state_root=state_root)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_federation(grid, cfg, run_dir=run_dir, report=report, **federation_kwargs)
        except BaseException as e:  # re-raised below, in the caller's thread
            outcome["error"] = e

    client_app = build_client_app(mods=[simulated_node_config(nodes), *client_mods])
    cpus = max(1, min(os.cpu_count() or 1, len(nodes)))
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        },
    }
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=len(nodes), backend_config=backend_config
    )
    _stop_ray()
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a result (see Flower's log above)")
    summary: dict[str, Any] = outcome["summary"]
    return summary


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
