"""The Flower topology of a one-host deployment: one SuperLink, one SuperNode per region, the ``flwr`` CLI.

:class:`LocalDeployment` starts exactly what a real multi-machine federation runs (``docs/deployment.md``),
only with every party on 127.0.0.1: a ``flower-superlink`` with TLS, SuperNode authentication, process
isolation (each run's ServerApp a fork of ``fedcrm server exec``, :mod:`fedcrm.deploy.server_exec`),
runtime dependency installation off and a SQLite database; one ``flower-supernode`` per region
with its own ``FLWR_HOME``, port and ``--node-config`` (:class:`fedcrm.node_settings.NodeSettings`: region,
data file, state folder, policy, delimiter), as its data owner would set it; and the ``flwr`` CLI against a
connection in its own ``$FLWR_HOME/config.toml``. Every process is started and stopped by
:mod:`fedcrm.deploy.supervisor`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcrm.config import ExperimentConfig
from fedcrm.deploy.bundle import stage_bundle
from fedcrm.deploy.certs import CertificateBundle
from fedcrm.deploy.proxy import ProxySettings, start_proxy
from fedcrm.deploy.supervisor import Component, Report, free_port, pump, start_component
from fedcrm.errors import ConfigError, FederationError
from fedcrm.node_settings import NodeSettings, region_settings

__all__ = ["COMPLETED", "CONNECTION", "FINISHED", "SERVER_EXEC", "LocalDeployment", "node_config_arg", "region_nodes"]

CONNECTION = "fedcrm-local"  # the connection's name in the CLI's config.toml
FINISHED = "finished:"
COMPLETED = "finished:completed"
SERVER_EXEC = "server-exec"  # the component that starts each run's ServerApp


def node_config_arg(values: dict[str, str]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML strings (JSON escaping is valid TOML)."""
    for key in values:
        if not key.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"node config key {key!r}: use letters, digits, '-' or '_'")
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in values.items())


def region_nodes(cfg: ExperimentConfig, *, state_root: Path, data_dir: Path) -> list[NodeSettings]:
    """The regions' node settings for a one-host deployment, where this machine plays every data owner.

    A ``split:`` config is split here, once, into ``data_dir`` (as ``fedcrm run`` does in simulation):
    the server never reads or sends these paths, each SuperNode gets its own file in its node config.
    A config that names its regions without paths (``regions: [eu, us]``) cannot run on one host: there
    is no file to give the nodes.
    """
    from fedcrm.config import NODE_PATH_PLACEHOLDER
    from fedcrm.experiment import materialise_regions

    unnamed = [r for r, p in cfg.regions.items() if p.parts and p.parts[0] == NODE_PATH_PLACEHOLDER]
    if unnamed and cfg.split is None:
        raise ConfigError(
            f"`regions`: {unnamed} have no data file; `fedcrm deploy local` plays every data owner and needs "
            "`regions: {name: file}` (or a `split:` section). On real machines each data owner sets the file "
            "with flower-supernode --node-config (docs/deployment.md)"
        )
    return list(region_settings(materialise_regions(cfg, data_dir=data_dir), state_root=state_root).values())


class LocalDeployment:
    """SuperLink, SuperNodes and the ``flwr`` CLI on loopback; a context manager that stops them all.

    ``tls=False`` runs the SuperLink and SuperNodes in plaintext (``--insecure``; Flower then allows no
    SuperNode authentication either). That exists for one test only, the wire audit, which must read
    the bytes the regions send; the CLI never offers it.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        certs: CertificateBundle | None,
        tls: bool = True,
        report: Report = print,
        bin_dir: Path | None = None,
    ) -> None:
        if tls and certs is None:
            raise ConfigError("a TLS deployment needs certificates (fedcrm certs)")
        self.workdir = Path(workdir).resolve()
        self.certs = certs
        self.tls = tls
        self.report = report
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.logs = self.workdir / "logs"
        self.cli_home = self.workdir / "cli"
        self.superlink: Component | None = None
        self.server_exec: Component | None = None  # `fedcrm server exec`: each run's ServerApp
        self.supernodes: dict[str, Component] = {}
        self.executors: dict[str, Component] = {}  # each gated region's `fedcrm region exec`
        self.others: list[Component] = []
        self.proxy: Component | None = None  # the regions' door to the Fleet API (fedcrm.deploy.proxy)
        self.port = 0
        for d in (self.logs, self.cli_home):
            d.mkdir(parents=True, exist_ok=True)

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _exe(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            found = shutil.which(name)
            if found is None:
                raise ConfigError(f"`{name}` not found next to {sys.executable} nor on PATH: install flwr 1.42")
            return found
        return str(path)

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_HOME"] = str(flwr_home)
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: ours, not another install.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
        return env

    def _start(self, name: str, argv: list[str], *, flwr_home: Path, stdout_pipe: bool = False) -> Component:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return start_component(
            name,
            argv,
            env=self._env(flwr_home),
            cwd=self.workdir,
            log_path=self.logs / f"{name}.log",
            stdout_pipe=stdout_pipe,
        )

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's connection."""
        try:
            res = subprocess.run(
                [self._exe("flwr"), *args],
                env=self._env(self.cli_home),
                cwd=str(self.workdir),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise FederationError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from e
        if check and res.returncode != 0:
            raise FederationError(
                f"`flwr {' '.join(args)}` failed (exit status {res.returncode}): {(res.stdout + res.stderr)[-1500:]}"
            )
        return res

    def _flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            data = json.loads(res.stdout[res.stdout.find("{") :])
        except ValueError as e:
            raise FederationError(f"`flwr {' '.join(args)}` gave no JSON: {(res.stdout + res.stderr)[-800:]}") from e
        if not data.get("success", False):
            raise FederationError(f"`flwr {' '.join(args)}` failed: {data.get('error-message', data)}")
        return dict(data)

    # -- SuperLink -----------------------------------------------------------------------------------

    def start_superlink(self, *, ready_timeout: float = 180.0) -> None:
        """Start the SuperLink on a free loopback port and wait until its Control API answers."""
        home = self.workdir / "superlink"
        db = home / "state.db"
        home.mkdir(parents=True, exist_ok=True)
        for stale in home.glob("state.db*"):  # a fresh Flower state per deployment; fedcrm's lives in --state
            stale.unlink()
        self.port = free_port()
        argv = [self._exe("flower-superlink")]
        if self.tls:
            assert self.certs is not None
            argv += [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        else:
            argv += ["--insecure"]  # Flower then refuses --enable-supernode-auth: it needs TLS
        argv += [
            *(["--enable-supernode-auth"] if self.tls else []),
            "--isolation", "process",  # the ServerApps: `fedcrm server exec`, started below
            "--disable-runtime-dependency-installation",
            "--database", str(db),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self._write_cli_config()
        self.superlink = self._start("superlink", argv, flwr_home=home)
        deadline = time.time() + ready_timeout
        while True:
            if not self.superlink.alive():
                raise FederationError(f"the SuperLink exited at start:\n{self.superlink.log_tail()}")
            if self.flwr("ls", CONNECTION, check=False, timeout=60).returncode == 0:
                break
            if time.time() > deadline:
                raise FederationError(f"the SuperLink did not answer within {ready_timeout:.0f} s")
            time.sleep(0.5)
        self.superlink.refresh_groups()
        self.start_server_exec()
        mode = "TLS, SuperNode authentication on" if self.tls else "PLAINTEXT, no SuperNode authentication"
        self.report(f"SuperLink up on {self.address} ({mode})")

    def start_server_exec(self, *, superlink_pid: int | None = None) -> Component:
        """Start ``fedcrm server exec`` against the SuperLink's Runtime API: it forks each run's ServerApp
        from a process that imported fedcrm once. It ends with the SuperLink (``--parent-pid``: this
        deployment's, or ``superlink_pid`` for a SuperLink that an earlier command started)."""
        parent = superlink_pid if superlink_pid is not None else self.superlink.pid if self.superlink else None
        if parent is None:
            raise FederationError("no SuperLink to start the server's executor for")
        argv = [sys.executable, "-m", "fedcrm.cli", "server", "exec", "--runtime-api-address", self.address]
        if self.tls:
            assert self.certs is not None
            argv += ["--root-certificates", str(Path(self.certs.ca_cert).resolve())]
        else:
            argv += ["--insecure"]
        self.server_exec = self._start(
            SERVER_EXEC, [*argv, "--parent-pid", str(parent)], flwr_home=self.workdir / "superlink"
        )
        return self.server_exec

    def _write_cli_config(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            assert self.certs is not None
            lines += [f"root-certificates = {json.dumps(str(Path(self.certs.ca_cert).resolve()))}", "insecure = false"]
        else:
            lines += ["insecure = true"]
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start_proxy(self, settings: ProxySettings) -> str:
        """Start the Fleet-only proxy in front of the running SuperLink; returns the address SuperNodes dial."""
        if not self.tls or self.certs is None:
            raise ConfigError("the proxy terminates TLS with the deployment's certificates: it needs a TLS deployment")
        self.proxy = start_proxy(
            settings=settings,
            superlink_port=self.port,
            certs=self.certs,
            folder=self.workdir / "proxy",
            logs=self.logs,
            env=self._env(self.workdir / "proxy"),
        )
        self.report(f"proxy up on {settings.address}: Fleet API only; Control/Runtime from {list(settings.operators)}")
        return settings.dial

    # -- SuperNodes ----------------------------------------------------------------------------------

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key (Control API); returns its node id."""
        data = self._flwr_json("supernode", "register", str(public_key), CONNECTION)
        return int(data["node-id"])

    def node_status(self) -> dict[int, str]:
        """node id -> registered / online / offline, as the SuperLink sees it."""
        data = self._flwr_json("supernode", "ls", CONNECTION)
        return {int(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

    def start_supernode(
        self,
        name: str,
        *,
        private_key: Path | None,
        node_config: dict[str, str] | None = None,
        root_certificates: Path | None = None,
        superlink: str | None = None,
        extra_args: Sequence[str] = (),
        trust: Path | None = None,
    ) -> Component:
        """Start one SuperNode with its own FLWR_HOME and Runtime API port (``name`` names both).

        With ``trust`` (the region's trust file) the SuperNode starts no ClientApp itself
        (``--isolation process``): the region's ``fedcrm region exec`` does, only for approved bundles.
        """
        argv = [self._exe("flower-supernode"), "--superlink", superlink or self.address]
        if self.tls:
            assert self.certs is not None
            argv += ["--root-certificates", str(root_certificates or self.certs.ca_cert)]
        else:
            argv += ["--insecure"]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if node_config:
            argv += ["--node-config", node_config_arg(node_config)]
        runtime_port = free_port()
        argv += ["--host", "127.0.0.1", "--port", str(runtime_port), *extra_args]
        if trust is not None:
            argv += ["--isolation", "process"]
        home = self.workdir / "supernodes" / name
        comp = self._start(f"supernode-{name}", argv, flwr_home=home)
        self.supernodes[name] = comp
        if trust is not None:
            # The Runtime API stays on loopback, between the SuperNode and the region's own executor.
            self.executors[name] = self._start(
                f"exec-{name}",
                [sys.executable, "-m", "fedcrm.cli", "region", "exec", "--runtime-api-address",
                 f"127.0.0.1:{runtime_port}", "--trust", str(Path(trust).resolve()), "--insecure",
                 "--parent-pid", str(comp.pid)],
                flwr_home=home,
            )  # fmt: skip
        return comp

    def wait_nodes(self, node_ids: Sequence[int] = (), *, status: str, count: int = 0, timeout: float = 180.0) -> None:
        """Wait until every node in ``node_ids`` (and at least ``count`` nodes) has ``status`` (online/offline)."""
        deadline = time.time() + timeout
        while True:
            seen = self.node_status()
            if all(seen.get(n) == status for n in node_ids) and sum(v == status for v in seen.values()) >= count:
                return
            for comp in [*self.supernodes.values(), *self.executors.values()]:
                if status == "online" and not comp.alive():
                    raise FederationError(f"{comp.name} exited at start:\n{comp.log_tail()}")
            if time.time() > deadline:
                raise FederationError(f"SuperNodes not {status} within {timeout:.0f} s: {seen}")
            time.sleep(1.0)

    # -- runs --------------------------------------------------------------------------------------

    def submit(self, *, app_dir: Path, run_config: dict[str, str]) -> int:
        """``flwr run APP`` with ``run_config`` (written to a TOML file: paths need no shell quoting)."""
        path = self.workdir / "run-config.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()), encoding="utf-8")
        # `flwr run` builds the bundle from the folder it is given by walking all of it: from the app's
        # source checkout (its virtual environment included) that took seconds; its staged files, none.
        staged = stage_bundle(app_dir, into=self.workdir / "bundle")
        data = self._flwr_json("run", str(staged), CONNECTION, "--run-config", str(path), timeout=300)
        run_id = data.get("run-id")
        if not run_id:
            raise FederationError(f"`flwr run` gave no run id: {data}")
        return int(run_id)

    def run_status(self, run_id: int) -> dict[str, Any]:
        data = self._flwr_json("ls", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs", [])
        if not runs:
            raise FederationError(f"run {run_id} is unknown to the SuperLink")
        return dict(runs[0])

    def wait_run(
        self,
        run_id: int,
        *,
        timeout: float,
        on_line: Report | None = None,
        poll_s: float = 10.0,
        while_waiting: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Stream the run's log to ``on_line`` until it ends; return its final status (``flwr ls``).

        ``flwr log --stream`` ends when the run ends; the status is polled as well in case it does not.
        """
        stream = self._start(
            f"log-{run_id}",
            [self._exe("flwr"), "log", str(run_id), CONNECTION, "--stream"],
            flwr_home=self.cli_home,
            stdout_pipe=True,
        )
        self.others.append(stream)
        reader = threading.Thread(target=pump, args=(stream, on_line), daemon=True)
        reader.start()
        deadline = time.time() + timeout
        last_poll = time.time()
        status: dict[str, Any] = {}
        try:
            while time.time() < deadline:
                if while_waiting is not None:
                    while_waiting()
                if time.time() - last_poll > (2.0 if not stream.alive() else poll_s):
                    last_poll = time.time()
                    status = self.run_status(run_id)
                    if str(status.get("status", "")).startswith(FINISHED):
                        break
                for comp in (self.superlink, self.server_exec):
                    if comp is not None and not comp.alive():
                        raise FederationError(f"{comp.name} stopped during the run:\n{comp.log_tail()}")
                time.sleep(0.5)
            else:
                with contextlib.suppress(FederationError):
                    self.flwr("stop", str(run_id), CONNECTION, check=False, timeout=60)
                raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s (stopped)")
        finally:
            stream.stop(grace_s=3)
            reader.join(timeout=5)
        return status

    # -- stopping ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the SuperNodes, anything else, the server's executor, then the SuperLink; raise if a process
        survives."""
        left: list[str] = []
        for comp in [*self.supernodes.values(), *self.executors.values(), *self.others]:
            left += comp.stop()
        if self.server_exec is not None:
            left += self.server_exec.stop()
        if self.proxy is not None:
            left += self.proxy.stop()
        if self.superlink is not None:
            left += self.superlink.stop()
        if left:
            raise FederationError(f"processes still running after the deployment was stopped: {left}")

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
