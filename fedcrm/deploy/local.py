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

The pieces: :mod:`fedcrm.deploy.topology` (the SuperLink, SuperNodes and ``flwr`` CLI) and
:mod:`fedcrm.deploy.supervisor` (every process they start); this module is the one-host setup
(certificates, keys, approval) and :func:`deploy_local`, which runs them in order.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrm.config import load_config
from fedcrm.deploy.approval import SIGNATURE_KEY, bundle_digest, sign_bundle
from fedcrm.deploy.bundle import build_bundle
from fedcrm.deploy.certs import (
    CertificateBundle,
    create_bundle_signing_key,
    create_certificates,
    create_node_key,
    public_key_fingerprint,
    supernode_key_paths,
)
from fedcrm.deploy.proxy import ProxySettings
from fedcrm.deploy.supervisor import Component, Report, free_port, terminate_as_interrupt
from fedcrm.deploy.topology import COMPLETED, CONNECTION, LocalDeployment, node_config_arg, region_nodes
from fedcrm.errors import ConfigError
from fedcrm.fl.registry import NodeRegistry
from fedcrm.node_settings import NodeSettings
from fedcrm.run_summary import RunSummary

__all__ = [
    "COMPLETED",
    "CONNECTION",
    "Component",
    "DeploymentResult",
    "LocalDeployment",
    "Prepared",
    "approve_locally",
    "default_app_dir",
    "deploy_local",
    "free_port",
    "load_or_create_certificates",
    "load_or_create_node_key",
    "node_config_arg",
    "prepare",
    "region_nodes",
    "sign_app",
    "start_federation",
    "submit_and_wait",
]


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


def load_or_create_certificates(out_dir: Path) -> CertificateBundle:
    """The operator's part: reuse the CA and SuperLink certificate in ``out_dir``, or create them."""
    out_dir = Path(out_dir)
    ca_key, ca_crt, srv_key, srv_crt = (out_dir / n for n in ("ca.key", "ca.crt", "server.key", "server.crt"))
    if not ca_crt.exists():
        return create_certificates(out_dir=out_dir)
    if not (srv_key.exists() and srv_crt.exists()):
        raise ConfigError(f"{out_dir}: ca.crt exists but server.key/server.crt do not; use a fresh folder")
    return CertificateBundle(
        out_dir=out_dir,
        ca_key=ca_key,
        ca_cert=ca_crt,
        server_key=srv_key,
        server_cert=srv_crt,
        supernode_public_keys={},
        hosts=("localhost", "127.0.0.1"),
    )


def sign_app(app_dir: Path, *, keys_dir: Path) -> tuple[str, Path]:
    """Play the data owners' bundle reviewer on one host: sign the app as it is on disk now.

    The signing key (``keys_dir/bundle-signer-local.key``) is made once and reused. Returns the signature
    (for the run config) and the public key the regions' trust files name. A long-lived federation signs
    at every submission: the bundle carries the configs, so editing one changes its digest.
    """
    key, pub = Path(keys_dir) / "bundle-signer-local.key", Path(keys_dir) / "bundle-signer-local.pub"
    if not key.exists():
        key, pub = create_bundle_signing_key(out_dir=Path(keys_dir), name="local")
    return sign_bundle(digest=bundle_digest(build_bundle(app_dir)), private_key=key), pub


def approve_locally(
    app_dir: Path, *, keys_dir: Path, trust_dir: Path, regions: Sequence[str]
) -> tuple[str, dict[str, Path]]:
    """Sign the app (:func:`sign_app`) and write one trust file per region trusting only that key.

    Returns the signature (for the run config) and region -> trust file.
    """
    import yaml

    signature, pub = sign_app(app_dir, keys_dir=keys_dir)
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


@dataclass
class DeploymentResult:
    run_id: int
    status: dict[str, Any]
    run_dir: Path
    summary: RunSummary | None  # None when the run wrote no summary
    workdir: Path

    @property
    def completed(self) -> bool:
        return self.status.get("status") == COMPLETED


@dataclass
class Prepared:
    """A one-host federation before its first process starts: certificates, keys, approval, node settings."""

    config: Path
    workdir: Path
    app: Path
    nodes: list[NodeSettings]
    certs: CertificateBundle
    keys: dict[str, tuple[Path, Path]]  # region -> (private, public) SuperNode key
    registry: NodeRegistry
    signature: str
    trust: dict[str, Path]


def prepare(config: Path, *, workdir: Path, state_root: Path, app_dir: Path | None = None) -> Prepared:
    """Make (once) and load what ``deploy local`` and ``deploy up`` need, before starting any process.

    Certificates are made in ``WORKDIR/certs``; each region's node key in ``WORKDIR/regions/<region>``
    (its data owner's host, in a real federation); a ``split:`` config is split into ``WORKDIR/data``.
    The node registry starts empty: the SuperLink starts with a fresh state, earlier node ids are gone.
    """
    config = Path(config).resolve()
    cfg = load_config(config)
    workdir = Path(workdir).resolve()
    app = Path(app_dir).resolve() if app_dir is not None else default_app_dir()
    nodes = region_nodes(cfg, state_root=Path(state_root), data_dir=workdir / "data")
    certs = load_or_create_certificates(workdir / "certs")
    keys = {n.region: load_or_create_node_key(workdir / "regions" / n.region, region=n.region) for n in nodes}
    registry = NodeRegistry(workdir / "superlink" / "node-registry")
    if registry.directory.exists():
        shutil.rmtree(registry.directory)
    signature, trust = approve_locally(
        app, keys_dir=workdir / "certs", trust_dir=workdir / "trust", regions=[n.region for n in nodes]
    )
    return Prepared(
        config=config,
        workdir=workdir,
        app=app,
        nodes=nodes,
        certs=certs,
        keys=keys,
        registry=registry,
        signature=signature,
        trust=trust,
    )


def start_federation(
    dep: LocalDeployment, prep: Prepared, *, report: Report = print, proxy: ProxySettings | None = None
) -> dict[str, int]:
    """Start the SuperLink, register every region's key, start one SuperNode per region, wait until online.

    With ``proxy`` the SuperNodes reach the SuperLink through the Fleet-only proxy (:mod:`fedcrm.deploy.proxy`).
    Returns region -> node id (also recorded in the node registry, with the key's fingerprint).
    """
    dep.start_superlink()
    fleet = dep.start_proxy(proxy) if proxy is not None else None
    node_ids = {}
    for node in prep.nodes:
        public = prep.keys[node.region][1]
        node_ids[node.region] = dep.register(public)
        prep.registry.record(
            node_id=node_ids[node.region], region=node.region, public_key_sha256=public_key_fingerprint(public)
        )
    for node in prep.nodes:
        dep.start_supernode(
            node.region,
            private_key=prep.keys[node.region][0],
            node_config=node.node_config(),
            trust=prep.trust[node.region],
            superlink=fleet,
        )
    dep.wait_nodes(list(node_ids.values()), status="online")
    report(f"{len(prep.nodes)} SuperNodes online: " + ", ".join(f"{r} (node {i})" for r, i in node_ids.items()))
    return node_ids


def submit_and_wait(
    dep: LocalDeployment,
    *,
    config: Path,
    run_dir: Path,
    app: Path,
    signature: str,
    registry: Path,
    extra_run_config: dict[str, str] | None = None,
    report: Report = print,
    run_timeout_s: float = 3600.0,
    during_run: Callable[[LocalDeployment], None] | None = None,
) -> DeploymentResult:
    """Submit ``config`` with ``flwr run`` to a running deployment, stream its log, wait for its end.

    The run config carries the bundle's signature (each region's executor checks it) and the node
    registry (the server rejects a reply claiming another region than the one its node was registered for).
    """
    submitted = time.time()
    run_id = dep.submit(
        app_dir=app,
        run_config={
            "experiment-config": str(config),
            "run-dir": str(run_dir),
            SIGNATURE_KEY: signature,
            "node-registry": str(registry),
            **(extra_run_config or {}),
        },
    )
    report(f"run {run_id} submitted; streaming its log")
    if during_run is not None:
        during_run(dep)
    status = dep.wait_run(run_id, timeout=run_timeout_s, on_line=report)
    summary_path = RunSummary.path_in(run_dir)
    fresh = summary_path.exists() and summary_path.stat().st_mtime >= submitted - 1  # not an older run's
    summary = RunSummary.read(run_dir) if fresh else None
    return DeploymentResult(run_id=run_id, status=status, run_dir=run_dir, summary=summary, workdir=dep.workdir)


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
    prep = prepare(config, workdir=workdir, state_root=state_root, app_dir=app_dir)
    cfg = load_config(prep.config)
    run_dir = Path(run_dir).resolve() if run_dir is not None else (cfg.output_dir / cfg.name).resolve()
    with terminate_as_interrupt(), LocalDeployment(workdir=prep.workdir, certs=prep.certs, report=report) as dep:
        start_federation(dep, prep, report=report)
        return submit_and_wait(
            dep,
            config=prep.config,
            run_dir=run_dir,
            app=prep.app,
            signature=prep.signature,
            registry=prep.registry.directory,
            report=report,
            run_timeout_s=run_timeout_s,
            during_run=during_run,
        )
