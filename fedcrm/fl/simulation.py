"""Running a federation on one machine with Flower's Simulation Engine (Ray), one virtual SuperNode
per region.

In simulation the machine plays every data owner: a client mod gives each virtual node the
node config its data owner would set on a real SuperNode (region, data file, state folder), looked
up by Flower's partition id, and records in the run's node registry which node id it gave which
region (the operator's registration, in deployment). The ClientApp's own code is the deployed one.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedcrm.config import ExperimentConfig
from fedcrm.errors import ConfigError
from fedcrm.fl.client import build_client_app
from fedcrm.fl.delivery import use_one_pass_delivery

# Re-exported: the node table moved to its own module in 0.2.0 (what a ClientApp process imports).
from fedcrm.fl.node_table import NodeConfigs, simulated_node_config, simulated_nodes, write_node_table  # noqa: F401
from fedcrm.fl.registry import NodeRegistry
from fedcrm.fl.server import Report, run_federation
from fedcrm.run_summary import RunSummary

# Regions one client process serves per round before a second process pays for its ~0.45 GB.
REGIONS_PER_PROCESS = 8
# How often the server looks for replies in simulation (Flower's in-memory grid default: 0.1 s): every
# 10 ms, and 0.1 ms more per region, up to Flower's 0.1 s (see _poll_often).
SIMULATION_POLL_S = 0.01
POLL_S_PER_REGION = 0.0001


def client_processes(regions: int, *, cpus: int | None = None) -> int:
    """How many ClientApp processes (Ray actors) the simulation runs.

    A process costs ~0.45 GB (torch, pandas, Opacus, Flower), while a region's round on a CRM table of
    up to ~100k customers takes tens of milliseconds: messaging, not training, sets the pace. So one
    process serves up to REGIONS_PER_PROCESS regions, and more are started only for more regions, up
    to one per core. docs/benchmarks.md has the measurements behind this.
    """
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(cpus, -(-regions // REGIONS_PER_PROCESS)))


def poll_interval(regions: int) -> float:
    """Seconds between the server's looks for replies in a simulation of ``regions`` regions.

    In simulation a reply is a queue away, and each of a round's two phases waited half a poll on
    average with Flower's 0.1 s: ~0.1 s of a 0.6 s Telco round, hence 10 ms for small federations. But
    each look checks every outstanding message under the link state's lock, the lock the delivery
    thread needs too: at 1,000 regions a look every 10 ms kept a core half busy for the whole round
    (py-spy, docs/benchmarks.md). So the interval grows with the regions, back to Flower's 0.1 s.
    """
    return min(0.1, max(SIMULATION_POLL_S, POLL_S_PER_REGION * regions))


def _poll_often(grid: Grid, *, regions: int) -> None:
    """Look for replies every :func:`poll_interval`, not every 100 ms (Flower's in-memory grid default)."""
    interval = poll_interval(regions)
    if getattr(grid, "pull_interval", 0) > interval:
        grid.pull_interval = interval  # type: ignore[attr-defined]


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
    processes: int | None = None,
    ray_address: str | None = None,
    **federation_kwargs: Any,
) -> RunSummary:
    """Run the experiment in simulation; returns the run summary. Leaves no process behind.

    ``client_mods`` are extra Flower client mods (e.g. fault injection in tests), applied inside the
    node-config mod so they see the region's settings. ``processes``: ClientApp processes to run
    (default: :func:`client_processes`). ``ray_address``: attach to this running Ray cluster (``HOST:PORT``
    of its head) instead of starting Ray here; the cluster's CPUs decide how many ClientApps run, one per
    CPU on every node, and the cluster is left running.
    """
    from flwr.simulation import run_simulation

    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ["FLWR_HOME"] = str(run_dir / ".flwr")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _quiet_flower()
    nodes = simulated_nodes(cfg, state_root=state_root)
    registry_dir = run_dir / ".flwr" / "node-registry"
    if registry_dir.exists():
        shutil.rmtree(registry_dir)  # node ids are this simulation's: an earlier run's are not registered
    registry = NodeRegistry(registry_dir)
    federation_kwargs.setdefault("registry", registry)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _poll_often(grid, regions=len(cfg.regions))
        try:
            outcome["summary"] = run_federation(grid, cfg, run_dir=run_dir, report=report, **federation_kwargs)
        except BaseException as e:  # re-raised below, in the caller's thread
            outcome["error"] = e

    node_table = write_node_table(nodes, state_root=state_root)
    client_app = build_client_app(mods=[simulated_node_config(node_table, registry=registry), *client_mods])
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": ray_init_args(len(nodes), processes=processes, ray_address=ray_address),
    }
    with use_one_pass_delivery():  # Flower's delivery scans its store once per node: N² per sweep
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=len(nodes), backend_config=backend_config
        )
    _stop_ray()
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a result (see Flower's log above)")
    summary: RunSummary = outcome["summary"]
    return summary


def ray_init_args(regions: int, *, processes: int | None, ray_address: str | None) -> dict[str, Any]:
    """How Flower's Ray backend starts Ray, or attaches to a cluster that is already running.

    Flower starts as many ClientApp actors as the CPUs Ray has allow at 1 CPU each: here, the processes
    asked for; on an existing cluster, every CPU of every node (Ray refuses a CPU count when it attaches).
    """
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if ray_address is not None:
        if processes is not None:
            raise ConfigError(
                "--processes and --ray-address: on a Ray cluster the cluster's CPUs decide how many "
                "ClientApps run; give one or the other"
            )
        _check_reachable(ray_address)
        return {"address": ray_address, **quiet}
    actors = client_processes(regions) if processes is None else processes
    if actors < 1:
        raise ValueError(f"processes must be >= 1, got {actors}")
    # "local": a Ray of this run's own, even when a cluster runs on this machine (`ray start` leaves its
    # address in /tmp/ray for ray.init() to join, and joining refuses a CPU count).
    return {"address": "local", "num_cpus": actors, "include_dashboard": False, **quiet}


def _check_reachable(ray_address: str) -> None:
    """Fail at once, in words, when the head is not there (Ray itself retries for a minute, then hangs
    Flower's backend thread)."""
    host, _, port = ray_address.rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        raise ConfigError(
            f"--ray-address {ray_address!r}: expected HOST:PORT of the Ray head's GCS "
            "(what `ray start --head --port PORT` prints), e.g. 10.0.0.5:6379"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"--ray-address {ray_address}: no Ray head answers there ({e}). Start one with "
            f"`ray start --head --port {port}`, or leave --ray-address out to run on this machine"
        ) from e


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
