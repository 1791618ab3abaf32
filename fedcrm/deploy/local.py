"""A whole Flower deployment on one host, over loopback: the ``fedcrm deploy local`` command.

It runs exactly what a real multi-machine federation runs (``docs/deployment.md``), only with every
party on 127.0.0.1: a ``flower-superlink`` with TLS, SuperNode authentication, subprocess isolation,
runtime dependency installation off and a SQLite database; each region's public key registered
through the Control API; one ``flower-supernode`` per region with its own ``FLWR_HOME``, port and
``--node-config`` (region, data file, state folder, policy), as its data owner would set it; and the
run submitted with ``flwr run`` against a connection in the CLI's own ``$FLWR_HOME/config.toml``.

Each region runs only app bundles its data owner approved: its SuperNode uses ``--isolation process``
and the region's own executor (``fedcrm region exec``, :mod:`fedcrm.deploy.gate`) starts every
ClientApp after checking the bundle against the region's trust file. Here one signing key plays every
data owner's reviewer: it signs the app once, and each region's trust file names its public key.

Why a supervisor of process *groups*: each Flower component starts children of its own (a
``flower-superexec``, which starts one ``flwr-serverapp`` / ``flwr-clientapp`` process per run or
message), and the SuperLink starts its SuperExec in a new session. Every component is therefore
started in its own session, the process groups of all its descendants are collected before it is
stopped, and stopping checks that no process of any of those groups is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.deploy.approval import SIGNATURE_KEY, bundle_digest, sign_bundle
from fedcrm.deploy.certs import (
    CertificateBundle,
    create_bundle_signing_key,
    create_certificates,
    create_node_key,
    public_key_fingerprint,
    supernode_key_paths,
)
from fedcrm.errors import ConfigError, FederationError
from fedcrm.fl.registry import NodeRegistry

__all__ = [
    "CONNECTION",
    "Component",
    "DeploymentResult",
    "LocalDeployment",
    "RegionNode",
    "default_app_dir",
    "deploy_local",
    "free_port",
    "load_or_create_certificates",
    "load_or_create_node_key",
    "node_config_arg",
    "region_nodes",
]

Report = Callable[[str], None]
CONNECTION = "fedcrm-local"  # the connection's name in the CLI's config.toml
FINISHED = "finished:"
COMPLETED = "finished:completed"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_app_dir() -> Path:
    """The Flower app directory (the source checkout whose pyproject.toml declares ``[tool.flwr.app]``)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise ConfigError(
            f"no Flower app found at {root} (pyproject.toml with [tool.flwr.app]): run from a source checkout "
            "of fedcrm or pass --app DIR"
        )
    return root


def node_config_arg(values: dict[str, str]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML strings (JSON escaping is valid TOML)."""
    for key in values:
        if not key.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"node config key {key!r}: use letters, digits, '-' or '_'")
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in values.items())


# --- processes ------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc (Linux)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
        if len(rest) >= 3:
            table[int(entry.name)] = (int(rest[1]), int(rest[2]), rest[0])
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@dataclass
class Component:
    """One process we started (in its own session) and every process group its descendants use."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    groups: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh_groups(self) -> None:
        """Remember the process groups of all descendants (the SuperLink's SuperExec has its own session)."""
        table = _proc_table()
        self.groups.add(self.pid)
        for p in _descendants(self.pid, table):
            self.groups.add(table[p][1])

    def members(self) -> list[int]:
        """Live (non-zombie) processes of this component's groups."""
        return [p for p, (_, pgrp, state) in _proc_table().items() if pgrp in self.groups and state != "Z"]

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal_all(self, sig: int) -> None:
        for g in sorted(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)

    def stop(self, *, grace_s: float = 10.0, hard_s: float = 15.0) -> list[str]:
        """SIGTERM every group, SIGKILL what is left after ``grace_s``; return what still lives (nothing)."""
        if self.alive():
            self.refresh_groups()
        self.groups.add(self.pid)
        self.signal_all(signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and (self.alive() or self.members()):
            time.sleep(0.2)
        if self.alive() or self.members():
            self.signal_all(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=hard_s)
        deadline = time.time() + hard_s
        while time.time() < deadline and self.members():
            time.sleep(0.2)
        return [f"{p} {_cmdline(p)}" for p in self.members()]

    def kill(self) -> None:
        """SIGKILL the whole component at once, as a crash or a pulled plug would (tests)."""
        if self.alive():
            self.refresh_groups()
        self.groups.add(self.pid)
        self.signal_all(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)


# --- the deployment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionNode:
    """What one data owner sets on their SuperNode (``--node-config``): nothing of it comes from the server."""

    region: str
    data_path: Path
    state_dir: Path
    policy_path: Path | None = None

    def node_config(self) -> dict[str, str]:
        values = {"region": self.region, "data-path": str(self.data_path), "state-dir": str(self.state_dir)}
        if self.policy_path is not None:
            values["policy-path"] = str(self.policy_path)
        return values


def region_nodes(cfg: ExperimentConfig, *, state_root: Path, data_dir: Path) -> list[RegionNode]:
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
    cfg = materialise_regions(cfg, data_dir=data_dir)
    return [
        RegionNode(
            region=name,
            data_path=Path(path).resolve(),
            state_dir=(state_root / name).resolve(),
            policy_path=cfg.policies[name].resolve() if name in cfg.policies else None,
        )
        for name, path in cfg.regions.items()
    ]


def load_or_create_certificates(out_dir: Path) -> CertificateBundle:
    """The operator's part: reuse the CA and SuperLink certificate in ``out_dir``, or create them."""
    out_dir = Path(out_dir)
    ca_key, ca_crt, srv_key, srv_crt = (out_dir / n for n in ("ca.key", "ca.crt", "server.key", "server.crt"))
    if not ca_crt.exists():
        return create_certificates(out_dir=out_dir)
    if not (srv_key.exists() and srv_crt.exists()):
        raise ConfigError(f"{out_dir}: ca.crt exists but server.key/server.crt do not; use a fresh folder")
    return CertificateBundle(
        out_dir=out_dir, ca_key=ca_key, ca_cert=ca_crt, server_key=srv_key, server_cert=srv_crt,
        supernode_public_keys={}, hosts=("localhost", "127.0.0.1"),
    )


def build_bundle(app_dir: Path) -> bytes:
    """The app bundle (FAB) ``flwr run APP_DIR`` submits: Flower builds it deterministically."""
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(Path(app_dir)))


def approve_locally(
    app_dir: Path, *, keys_dir: Path, trust_dir: Path, regions: Sequence[str]
) -> tuple[str, dict[str, Path]]:
    """Play every data owner's bundle reviewer on one host: sign the app; one trust file per region.

    The signing key (``keys_dir/bundle-signer-local.key``) is made once and reused. Returns the signature
    (for the run config) and region -> trust file, each trusting only that key's signatures.
    """
    import yaml

    key, pub = Path(keys_dir) / "bundle-signer-local.key", Path(keys_dir) / "bundle-signer-local.pub"
    if not key.exists():
        key, pub = create_bundle_signing_key(out_dir=Path(keys_dir), name="local")
    signature = sign_bundle(digest=bundle_digest(build_bundle(app_dir)), private_key=key)
    Path(trust_dir).mkdir(parents=True, exist_ok=True)
    trust = {}
    for region in regions:
        trust[region] = Path(trust_dir) / f"{region}.yaml"
        trust[region].write_text(
            yaml.safe_dump({"approved_bundles": [], "trusted_signers": {"local": str(pub.resolve())}}),
            encoding="utf-8",
        )
    return signature, trust


def load_or_create_node_key(region_dir: Path, *, region: str) -> tuple[Path, Path]:
    """A data owner's part: their SuperNode key pair in their own folder, made there once (``certs node-key``).

    The operator's side of ``deploy local`` only ever reads the public half.
    """
    private, public = supernode_key_paths(Path(region_dir), region)
    if private.exists() and public.exists():
        return private, public
    return create_node_key(out_dir=Path(region_dir), region=region, overwrite=True)


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
        self.supernodes: dict[str, Component] = {}
        self.executors: dict[str, Component] = {}  # each gated region's `fedcrm region exec`
        self.others: list[Component] = []
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
        log_path = self.logs / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        try:
            popen = subprocess.Popen(
                argv,
                env=self._env(flwr_home),
                cwd=str(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole, never by a stray Ctrl-C
            )
        finally:
            log_file.close()
        comp = Component(name=name, popen=popen, log_path=log_path, groups={popen.pid})
        return comp

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
                "--ssl-ca-certfile", str(self.certs.ca_cert),
                "--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key),
            ]
        else:
            argv += ["--insecure"]  # Flower then refuses --enable-supernode-auth: it needs TLS
        argv += [
            *(["--enable-supernode-auth"] if self.tls else []),
            "--isolation", "subprocess",
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
        mode = "TLS, SuperNode authentication on" if self.tls else "PLAINTEXT, no SuperNode authentication"
        self.report(f"SuperLink up on {self.address} ({mode})")

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

    def wait_nodes(
        self, node_ids: Sequence[int] = (), *, status: str, count: int = 0, timeout: float = 180.0
    ) -> None:
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
        data = self._flwr_json("run", str(app_dir), CONNECTION, "--run-config", str(path), timeout=300)
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
        reader = threading.Thread(target=_pump, args=(stream, on_line), daemon=True)
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
                if self.superlink is not None and not self.superlink.alive():
                    raise FederationError(f"the SuperLink stopped during the run:\n{self.superlink.log_tail()}")
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
        """Stop the SuperNodes, then the SuperLink, then anything else; raise if a process survives."""
        left: list[str] = []
        for comp in [*self.supernodes.values(), *self.executors.values(), *self.others]:
            left += comp.stop()
        if self.superlink is not None:
            left += self.superlink.stop()
        if left:
            raise FederationError(f"processes still running after the deployment was stopped: {left}")

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pump(comp: Component, on_line: Report | None) -> None:
    """Copy a component's stdout to its log file and to ``on_line``, line by line."""
    assert comp.popen.stdout is not None
    with open(comp.log_path, "a", encoding="utf-8") as log:
        for raw in comp.popen.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log.write(line + "\n")
            log.flush()
            if on_line is not None:
                on_line(line)


@dataclass
class DeploymentResult:
    run_id: int
    status: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any] | None
    workdir: Path

    @property
    def completed(self) -> bool:
        return self.status.get("status") == COMPLETED


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does, so every started process is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_local(
    config: Path,
    *,
    workdir: Path,
    state_root: Path,
    run_dir: Path | None = None,
    app_dir: Path | None = None,
    report: Report = print,
    run_timeout_s: float = 3600.0,
    during_run: Callable[[LocalDeployment], None] | None = None,
) -> DeploymentResult:
    """Run ``config`` on a real SuperLink + one SuperNode per region, all on loopback, then stop them.

    Certificates are made (once) in ``WORKDIR/certs``; the SuperLink's and SuperNodes' Flower homes and
    logs go under ``WORKDIR``; each region's state (ledger, tombstones, audit log) under
    ``STATE_ROOT/<region>``, kept across runs. The ServerApp writes the run folder (``summary.json``,
    ``metrics.jsonl``, the model) on this machine. ``during_run`` is called once right after the run is
    submitted, with the live deployment (tests start misbehaving SuperNodes from it).
    """
    config = Path(config).resolve()
    cfg = load_config(config)
    workdir = Path(workdir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else (cfg.output_dir / cfg.name).resolve()
    app = Path(app_dir).resolve() if app_dir is not None else default_app_dir()
    nodes = region_nodes(cfg, state_root=Path(state_root), data_dir=workdir / "data")
    certs = load_or_create_certificates(workdir / "certs")
    # Each region's key is made in that region's own folder (its data owner's host, in a real federation).
    keys = {n.region: load_or_create_node_key(workdir / "regions" / n.region, region=n.region) for n in nodes}
    registry = NodeRegistry(workdir / "superlink" / "node-registry")
    if registry.directory.exists():
        shutil.rmtree(registry.directory)  # the SuperLink starts with a fresh state: earlier node ids are gone
    signature, trust = approve_locally(
        app, keys_dir=workdir / "certs", trust_dir=workdir / "trust", regions=[n.region for n in nodes]
    )
    with _terminate_as_interrupt(), LocalDeployment(workdir=workdir, certs=certs, report=report) as dep:
        dep.start_superlink()
        node_ids = {}
        for node in nodes:
            public = keys[node.region][1]
            node_ids[node.region] = dep.register(public)
            registry.record(node_id=node_ids[node.region], region=node.region,
                            public_key_sha256=public_key_fingerprint(public))
        for node in nodes:
            dep.start_supernode(
                node.region,
                private_key=keys[node.region][0],
                node_config=node.node_config(),
                trust=trust[node.region],
            )
        dep.wait_nodes(list(node_ids.values()), status="online")
        report(f"{len(nodes)} SuperNodes online: " + ", ".join(f"{r} (node {i})" for r, i in node_ids.items()))
        submitted = time.time()
        run_id = dep.submit(
            app_dir=app,
            run_config={"experiment-config": str(config), "run-dir": str(run_dir), SIGNATURE_KEY: signature,
                        "node-registry": str(registry.directory)},
        )
        report(f"run {run_id} submitted; streaming its log")
        if during_run is not None:
            during_run(dep)
        status = dep.wait_run(run_id, timeout=run_timeout_s, on_line=report)
    summary_path = run_dir / "summary.json"
    fresh = summary_path.exists() and summary_path.stat().st_mtime >= submitted - 1  # not an older run's
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if fresh else None
    return DeploymentResult(run_id=run_id, status=status, run_dir=run_dir, summary=summary, workdir=workdir)
