"""A one-host federation that stays up between runs: ``fedcrm deploy up / status / down`` and ``--federation``.

``deploy up`` starts what ``deploy local`` starts (:func:`fedcrm.deploy.local.prepare` and
:func:`~fedcrm.deploy.local.start_federation`: a TLS SuperLink with SuperNode authentication, every
region's key registered, one SuperNode per region behind its bundle gate) and leaves it running: every
process is in its own session, so it outlives the command. What a later command needs is written to
the deployment folder (``.fedcrm/deployments/NAME/``, or ``--workdir``):

- ``federation.json``: the config, state root, app, the SuperLink's port, each region's node id, key,
  node config and trust file, and every process started (pid, start time, command line, log);
- ``pids/<process>.pid``: the pids, for an operator's tools; ``logs/``: every process's log.
- with ``--public-address``, ``proxy/``: the Fleet-only proxy's ``nginx.conf`` and ``access.log``
  (:mod:`fedcrm.deploy.proxy`), its settings under ``proxy`` in ``federation.json``.

``deploy status`` checks each recorded process (the pid must still run the recorded command, started
at the recorded time) and asks the SuperLink which nodes are online. ``deploy down`` stops only those
processes (and what they started), never a process that merely reuses a recorded pid. ``deploy up`` on
a deployment that is up restarts only what is missing: a dead SuperNode (with its executor) rejoins
with its registered key; a dead SuperLink means a fresh start (its node registrations were in its state).

Runs go to the running SuperLink with Flower's own ``flwr run``
(:func:`~fedcrm.deploy.local.submit_and_wait`), signed again at submission (the bundle carries the
configs: an edited config is a new bundle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.config import ExperimentConfig, dump_yaml, load_config
from fedcrm.deploy.certs import CertificateBundle
from fedcrm.deploy.local import (
    DeploymentResult,
    LocalDeployment,
    load_or_create_certificates,
    prepare,
    sign_app,
    start_federation,
    submit_and_wait,
)
from fedcrm.deploy.proxy import PROXY, ProxySettings
from fedcrm.deploy.supervisor import Component, Recorded, Report, processes_with_env, terminate_as_interrupt
from fedcrm.deploy.topology import SERVER_EXEC
from fedcrm.durable import write_json_atomically
from fedcrm.errors import ConfigError, FederationError
from fedcrm.run_summary import RunSummary
from fedcrm.runs import Weights, save_weights

__all__ = ["DESCRIPTION", "Federation", "deployment_folder", "down", "retrain_on", "run_on", "status", "up"]

DESCRIPTION = "federation.json"
DEPLOYMENTS_ENV = "FEDCRM_DEPLOYMENTS"  # where named deployments live (default .fedcrm/deployments)
SUPERLINK = "superlink"


def deployment_folder(name: str, *, workdir: Path | None = None) -> Path:
    """The folder of deployment ``name``: ``workdir`` when given, else ``$FEDCRM_DEPLOYMENTS/NAME``.

    ``name`` may also be the path of a deployment folder (one holding ``federation.json``).
    """
    if workdir is not None:
        return Path(workdir).resolve()
    if (Path(name) / DESCRIPTION).is_file():
        return Path(name).resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"deployment name {name!r}: use letters, digits, '.', '-' or '_' (or a deployment folder)")
    return (Path(os.environ.get(DEPLOYMENTS_ENV, ".fedcrm/deployments")) / name).resolve()


@dataclass
class Federation:
    """A deployment left running by ``deploy up``, as its ``federation.json`` describes it."""

    folder: Path
    name: str
    config: Path
    state_root: Path
    app: Path
    port: int
    registry: Path
    regions: dict[str, dict[str, Any]]  # region -> node_id, private_key, node_config, trust
    processes: dict[str, Recorded] = field(default_factory=dict)
    proxy: ProxySettings | None = None  # the regions' Fleet-only door (``deploy up --public-address``)

    @classmethod
    def load(cls, folder: Path) -> Federation:
        path = Path(folder) / DESCRIPTION
        if not path.is_file():
            raise ConfigError(f"{folder}: no deployment here (no {DESCRIPTION}); start one with `fedcrm deploy up`")
        try:
            return cls.from_dict(Path(folder).resolve(), json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a deployment description ({type(e).__name__}: {e})") from None

    @classmethod
    def from_dict(cls, folder: Path, d: dict[str, Any]) -> Federation:
        paths = {k: Path(d[k]) for k in ("config", "state_root", "app", "registry")}
        processes = {k: Recorded.from_dict(v) for k, v in d["processes"].items()}
        return cls(
            folder=folder,
            name=str(d["name"]),
            port=int(d["port"]),
            regions=dict(d["regions"]),
            processes=processes,
            proxy=ProxySettings.from_dict(d["proxy"]) if d.get("proxy") else None,
            **paths,
        )

    def save(self) -> None:
        write_json_atomically(
            self.folder / DESCRIPTION,
            {
                "name": self.name,
                "config": str(self.config),
                "state_root": str(self.state_root),
                "app": str(self.app),
                "port": self.port,
                "address": f"127.0.0.1:{self.port}",
                "registry": str(self.registry),
                "regions": self.regions,
                "processes": {k: p.to_dict() for k, p in self.processes.items()},
                **({"proxy": self.proxy.to_dict()} if self.proxy is not None else {}),
            },
            what="describe the deployment",
        )
        pids = self.folder / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        for stale in pids.glob("*.pid"):
            if stale.stem not in self.processes:
                stale.unlink()
        for key, proc in self.processes.items():
            (pids / f"{key}.pid").write_text(f"{proc.pid}\n", encoding="utf-8")

    def certs(self) -> CertificateBundle:
        return load_or_create_certificates(self.folder / "certs")

    def attach(self, *, report: Report) -> LocalDeployment:
        """The ``flwr`` CLI and SuperNode starter of this deployment, for a command run after ``deploy up``."""
        dep = LocalDeployment(workdir=self.folder, certs=self.certs(), report=report)
        dep.port = self.port
        return dep

    def remember(self, comp: Component) -> None:
        self.processes[comp.name] = comp.record()

    def superlink_running(self) -> bool:
        proc = self.processes.get(SUPERLINK)
        return proc is not None and proc.running()


def up(
    config: Path,
    *,
    folder: Path,
    name: str,
    state_root: Path,
    app_dir: Path | None = None,
    report: Report = print,
    proxy: ProxySettings | None = None,
) -> Federation:
    """Start the federation of ``config`` in ``folder`` and leave it running; or, when it is up, restart
    only its dead SuperNodes. Returns its description (also written to ``folder/federation.json``).

    With ``proxy`` the SuperNodes connect through the Fleet-only proxy (:mod:`fedcrm.deploy.proxy`), as
    regions on other hosts must: the SuperLink itself stays on loopback.
    """
    folder = Path(folder).resolve()
    if (folder / DESCRIPTION).is_file():
        fed = Federation.load(folder)
        if fed.config != Path(config).resolve():
            raise ConfigError(
                f"deployment {fed.name} ({folder}) was started with {fed.config}, not {config}: "
                f"`fedcrm deploy down --name {fed.name}` first, or use another --name"
            )
        if fed.superlink_running():
            restart_missing(fed, report=report)
            return fed
        report(f"the SuperLink of {fed.name} is not running: stopping what is left and starting afresh")
        down(folder, report=report)
    prep = prepare(config, workdir=folder, state_root=state_root, app_dir=app_dir)
    fed = Federation(
        folder=folder,
        name=name,
        config=prep.config,
        state_root=Path(state_root).resolve(),
        app=prep.app,
        port=0,
        registry=prep.registry.directory,
        regions={},
        proxy=proxy,
    )
    dep = LocalDeployment(workdir=folder, certs=prep.certs, report=report)
    with terminate_as_interrupt():
        try:
            node_ids = start_federation(dep, prep, report=report, proxy=proxy)
        except BaseException:
            dep.stop()  # a half-started federation is not left behind
            raise
    fed.port = dep.port
    for node in prep.nodes:
        fed.regions[node.region] = {
            "node_id": node_ids[node.region],
            "private_key": str(prep.keys[node.region][0]),
            "node_config": node.node_config(),
            "trust": str(prep.trust[node.region]),
        }
    for comp in [dep.superlink, dep.server_exec, *dep.supernodes.values(), *dep.executors.values()]:
        assert comp is not None
        fed.remember(comp)
    if dep.proxy is not None:
        fed.remember(dep.proxy)
    fed.save()
    report(
        f"federation {name} is up on {dep.address}: {len(prep.nodes)} regions; `fedcrm deploy status "
        f"--name {name}`, `fedcrm run CONFIG --federation {name}`, `fedcrm deploy down --name {name}`"
    )
    return fed


def restart_missing(fed: Federation, *, report: Report = print, timeout: float = 180.0) -> list[str]:
    """Restart every region whose SuperNode is not running (with its executor); returns those regions.

    The SuperNode comes back with its registered key and node config, so the SuperLink sees the same
    node id online again.
    """
    dead = [r for r in fed.regions if not fed.processes[f"supernode-{r}"].running()]
    dep = fed.attach(report=report)
    server_exec = fed.processes.get(SERVER_EXEC)
    if server_exec is None or not server_exec.running():  # runs would wait for a ServerApp forever
        if server_exec is not None:
            server_exec.stop(grace_s=3)
        fed.remember(dep.start_server_exec(superlink_pid=fed.processes[SUPERLINK].pid))
        fed.save()
        report(f"federation {fed.name}: restarted {SERVER_EXEC}")
    fleet = restart_proxy(fed, dep, report=report)
    if not dead:
        report(f"federation {fed.name}: every region is running")
        return []
    # The SuperLink refuses a node id it still holds online: wait for the dead node's heartbeat to expire.
    dep.wait_nodes([int(fed.regions[r]["node_id"]) for r in dead], status="offline", timeout=timeout)
    for region in dead:
        fed.processes[f"exec-{region}"].stop(grace_s=3)  # it follows its SuperNode out; never two executors
        spec = fed.regions[region]
        dep.start_supernode(
            region,
            private_key=Path(spec["private_key"]),
            node_config=dict(spec["node_config"]),
            trust=Path(spec["trust"]),
            superlink=fleet,
        )
        fed.remember(dep.supernodes[region])
        fed.remember(dep.executors[region])
    fed.save()
    dep.wait_nodes([int(fed.regions[r]["node_id"]) for r in dead], status="online", timeout=timeout)
    report(f"federation {fed.name}: restarted {', '.join(dead)}")
    return dead


def restart_proxy(fed: Federation, dep: LocalDeployment, *, report: Report) -> str | None:
    """Restart the deployment's proxy if it has one and it is not running; the address SuperNodes dial."""
    if fed.proxy is None:
        return None
    recorded = fed.processes.get(PROXY)
    if recorded is None or not recorded.running():
        dep.start_proxy(fed.proxy)
        assert dep.proxy is not None
        fed.remember(dep.proxy)
        fed.save()
        report(f"federation {fed.name}: restarted the proxy")
    return fed.proxy.dial


def status(folder: Path) -> dict[str, Any]:
    """Each recorded process (pid, running) and each region's node as the SuperLink sees it; ``ok`` if all up."""
    fed = Federation.load(folder)
    procs = {k: {"pid": p.pid, "alive": p.running(), "log": str(p.log_path)} for k, p in fed.processes.items()}
    nodes: dict[str, dict[str, Any]] = {}
    error = None
    if procs[SUPERLINK]["alive"]:
        try:
            seen = fed.attach(report=lambda _: None).node_status()
        except FederationError as e:
            seen, error = {}, str(e)
        for region, spec in fed.regions.items():
            nodes[region] = {"node_id": spec["node_id"], "status": seen.get(int(spec["node_id"]), "unknown")}
    ok = all(p["alive"] for p in procs.values()) and all(n["status"] == "online" for n in nodes.values())
    return {
        "name": fed.name,
        "folder": str(fed.folder),
        "address": f"127.0.0.1:{fed.port}",
        **({"public_address": fed.proxy.address} if fed.proxy is not None else {}),
        "config": str(fed.config),
        "state_root": str(fed.state_root),
        "ok": ok and error is None,
        "processes": procs,
        "nodes": nodes,
        **({"error": error} if error else {}),
    }


def down(folder: Path, *, report: Report = print) -> list[str]:
    """Stop the processes ``deploy up`` started (SuperNodes, executors, then the SuperLink), by recorded pid.

    A pid is signalled only while it runs the recorded command with the recorded start time; then any
    process still carrying this deployment's ``FLWR_HOME`` (a ServerApp or ClientApp orphaned by a killed
    parent) is stopped too. Idempotent: a deployment already down, or never up, is left as it is.
    Returns the names of the processes stopped.
    """
    folder = Path(folder).resolve()
    if not (folder / DESCRIPTION).is_file():
        report(f"{folder}: no deployment description, nothing to stop")
        return []
    fed = Federation.load(folder)
    order = sorted(fed.processes, key=lambda k: k == SUPERLINK)  # the SuperLink last
    stopped, left = [], []
    for key in order:
        proc = fed.processes[key]
        if proc.running():
            left += proc.stop()
            stopped.append(key)
    for pid in processes_with_env("FLWR_HOME", under=folder):
        left += Recorded.of_pid(pid, name=f"orphan-{pid}", log_path=folder / "logs").stop(grace_s=3)
    if left:
        raise FederationError(f"deployment {fed.name}: processes still running after `deploy down`: {left}")
    for pid_file in (folder / "pids").glob("*.pid"):
        pid_file.unlink()
    report(f"federation {fed.name}: stopped {', '.join(stopped) if stopped else 'nothing (it was down)'}")
    return stopped


def run_on(
    folder: Path,
    config: Path,
    *,
    run_dir: Path | None = None,
    overrides: list[str] | None = None,
    extra_run_config: dict[str, str] | None = None,
    report: Report = print,
    run_timeout_s: float = 3600.0,
) -> DeploymentResult:
    """Submit ``config`` to the running federation in ``folder`` with ``flwr run``; stream and wait.

    The regions are the deployment's: each SuperNode's data file and state folder were set in its node
    config at ``deploy up``, so ``config`` must name the same regions. ``overrides`` (``KEY=VALUE``, as
    ``fedcrm run --set``) travel in the run config's ``overrides``; ``extra_run_config`` adds keys.
    """
    fed = Federation.load(folder)
    if not fed.superlink_running():
        raise FederationError(f"deployment {fed.name}: its SuperLink is not running; `fedcrm deploy up` first")
    server_exec = fed.processes.get(SERVER_EXEC)
    if server_exec is None or not server_exec.running():
        raise FederationError(
            f"deployment {fed.name}: the server's executor ({SERVER_EXEC}), which starts each run's ServerApp, "
            f"is not running; `fedcrm deploy up --name {fed.name}` restarts it"
        )
    config = Path(config).resolve()
    cfg = load_config(config)
    if set(cfg.regions) != set(fed.regions):
        raise ConfigError(
            f"{config}: regions {sorted(cfg.regions)}, but deployment {fed.name} serves "
            f"{sorted(fed.regions)} (started from {fed.config})"
        )
    if any(any(c.isspace() for c in o) for o in overrides or []):
        raise ConfigError(f"--set {overrides}: a value with spaces cannot travel in the run config")
    run_dir = Path(run_dir).resolve() if run_dir is not None else (cfg.output_dir / cfg.name).resolve()
    signature, _ = sign_app(fed.app, keys_dir=fed.folder / "certs")
    dep = fed.attach(report=report)
    extra = {**(extra_run_config or {}), **({"overrides": " ".join(overrides)} if overrides else {})}
    started = time.time()
    result = submit_and_wait(
        dep,
        config=config,
        run_dir=run_dir,
        app=fed.app,
        signature=signature,
        registry=fed.registry,
        report=report,
        run_timeout_s=run_timeout_s,
        extra_run_config=extra,
    )
    report(f"run {result.run_id} on federation {fed.name}: {time.time() - started:.1f} s")
    return result


def retrain_on(folder: Path, *, run_timeout_s: float = 3600.0) -> Callable[..., RunSummary]:
    """A ``simulate`` for :func:`fedcrm.unlearning.retrain.retrain` that trains on the running federation.

    Same signature as :func:`fedcrm.fl.simulation.run_simulated` as the retrain calls it. The ServerApp
    reads files, not Python objects: the run's config and the constituents kept as they are go to a
    folder of the deployment (``retrains/``), named in the run config (``shards``, ``initial-dir``,
    ``model-version``), and are removed afterwards.
    """
    fed = Federation.load(folder)

    def simulate(
        cfg: ExperimentConfig,
        *,
        run_dir: Path,
        state_root: Path,
        report: Report,
        shards: list[int],
        initial: dict[int, Weights],
        model_version: int,
    ) -> RunSummary:
        if Path(state_root).resolve() != fed.state_root:
            raise ConfigError(
                f"--state {state_root}: the regions of federation {fed.name} keep their state in "
                f"{fed.state_root} (set at `deploy up`)"
            )
        inputs = fed.folder / "retrains" / f"{Path(run_dir).parent.name}-v{model_version}"
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir(parents=True)
        try:
            (inputs / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            for k, weights in initial.items():
                save_weights(inputs / f"constituent-{k}.npz", weights)
            result = run_on(
                fed.folder,
                inputs / "config.yaml",
                run_dir=Path(run_dir),
                report=report,
                run_timeout_s=run_timeout_s,
                extra_run_config={
                    "shards": ",".join(str(k) for k in shards),
                    "initial-dir": str(inputs),
                    "model-version": str(model_version),
                },
            )
        finally:
            shutil.rmtree(inputs, ignore_errors=True)
        if not result.completed or result.summary is None:
            raise FederationError(
                f"the retrain run {result.run_id} on federation {fed.name} ended "
                f"{result.status.get('status', '?')}: {result.status.get('status-details', '')}"
            )
        return result.summary

    return simulate
