"""Deployment commands: ``fedcrm certs`` (TLS material), ``fedcrm certs node-key`` (a data owner's
SuperNode key), ``fedcrm deploy register-node`` (the node registry), ``fedcrm deploy local`` and the
long-lived federation: ``fedcrm deploy up / status / down`` (:mod:`fedcrm.deploy.federation`).

``deploy local`` starts, on this machine's loopback only, what a real federation runs on many machines
(docs/deployment.md): a TLS SuperLink with SuperNode authentication, one SuperNode per region, the run
submitted with ``flwr run``; it stops every process it started when the run ends, fails or is
interrupted (Ctrl-C).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fedcrm.deploy.local import DeploymentResult

from fedcrm.commands.common import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, console, exit_with, out
from fedcrm.errors import ConfigError, FedcrmError

deploy_app = typer.Typer(
    help="Run the federation on Flower's deployment engine (SuperLink + one SuperNode per region, TLS).",
    no_args_is_help=True,
)


DeployStateOpt = Annotated[
    Path, typer.Option("--state", help="Every region's state (ledger, tombstones), one sub-folder per region.")
]
AppOpt = Annotated[
    Path | None, typer.Option("--app", help="Flower app directory (default: this fedcrm source checkout).")
]


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


certs_app = typer.Typer(
    help="TLS material (operator) and SuperNode keys (each data owner, on their own host).",
    invoke_without_command=True,
)


def _public_keys(values: list[str]) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for value in values:
        region, sep, path = value.partition("=")
        if not sep or not region.strip() or not path.strip():
            raise ConfigError(f"--node-public-key: expected REGION=PATH (e.g. eu=supernode-eu.pub), got {value!r}")
        if region.strip() in keys:
            raise ConfigError(f"--node-public-key: region `{region.strip()}` given twice")
        keys[region.strip()] = Path(path.strip())
    return keys


@certs_app.callback()
def certs(
    ctx: typer.Context,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for the CA and the SuperLink's TLS key and certificate.")
    ] = None,
    node_public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--node-public-key",
            help="REGION=PATH of a public key a data owner made with `fedcrm certs node-key` (repeat); checked "
            "to load as Flower will load it.",
        ),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Name or IP address the SuperLink is reached by (repeat; default localhost and 127.0.0.1).",
        ),
    ] = None,
    valid_days: Annotated[int, typer.Option(help="Lifetime of the SuperLink's certificate, in days.")] = 365,
    ca_valid_days: Annotated[int, typer.Option(help="Lifetime of the CA, in days (default two years).")] = 730,
) -> None:
    """Create a private CA and the SuperLink's TLS certificate (operator); check the regions' public keys.

    Give ca.crt to every data owner and to the operator's flwr CLI, server.key/server.crt to the
    SuperLink; keep ca.key offline. Regions' private keys are never made here: each data owner runs
    `fedcrm certs node-key` on their own host and sends only the public key, which the operator
    registers (flwr supernode register, then fedcrm deploy register-node). Existing files are never
    overwritten.
    """
    if ctx.invoked_subcommand is not None:
        return
    if out_dir is None:
        exit_with(ConfigError("fedcrm certs: --out DIR is needed (or a subcommand: fedcrm certs node-key --help)"))
        return
    from fedcrm.deploy.certs import create_certificates, public_key_fingerprint

    try:
        bundle = create_certificates(
            out_dir=out_dir,
            node_public_keys=_public_keys(node_public_key or []),
            hosts=tuple(host) if host else ("localhost", "127.0.0.1"),
            valid_days=valid_days,
            ca_valid_days=ca_valid_days,
        )
        fingerprints = {r: public_key_fingerprint(p) for r, p in bundle.supernode_public_keys.items()}
    except FedcrmError as e:
        exit_with(e)
    out.print(f"CA: {bundle.ca_cert}, valid {ca_valid_days} days (its key {bundle.ca_key}: keep it offline)")
    out.print(
        f"SuperLink: {bundle.server_cert}, {bundle.server_key} for {', '.join(bundle.hosts)}, valid {valid_days} days"
    )
    for region, path in bundle.supernode_public_keys.items():
        out.print(
            f"region {region}: public key {path} (sha256 {fingerprints[region]}); register it: "
            f"flwr supernode register {path}, then fedcrm deploy register-node"
        )


@certs_app.command("node-key")
def node_key(
    out_dir: Annotated[Path, typer.Option("--out", help="A folder on this (the data owner's) host.")],
    region: Annotated[str, typer.Option("--region", help="The region this SuperNode serves.")],
) -> None:
    """Make this region's SuperNode key pair, on the data owner's own host.

    The private key (mode 0600) stays in --out and is passed to flower-supernode
    --auth-supernode-private-key; send only the public key (.pub) to the operator to register.
    """
    from fedcrm.deploy.certs import create_node_key, public_key_fingerprint

    try:
        private, public = create_node_key(out_dir=out_dir, region=region)
        fingerprint = public_key_fingerprint(public)
    except FedcrmError as e:
        exit_with(e)
    out.print(f"private key: {private} (mode 0600: it never leaves this host)")
    out.print(f"public key: {public} (sha256 {fingerprint}): send it to the operator to register")
    out.print(public.read_text(encoding="utf-8").strip(), highlight=False)


@deploy_app.command("register-node")
def register_node(
    registry: Annotated[Path, typer.Option("--registry", help="The node registry folder (run config node-registry).")],
    region: Annotated[str, typer.Option("--region", help="The region whose public key was registered.")],
    node_id: Annotated[int, typer.Option("--node-id", help="The node id `flwr supernode register` printed.")],
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="The registered public key, to record its fingerprint.")
    ] = None,
) -> None:
    """Record which node id was registered for which region: the server rejects replies from that node that
    claim any other region (and from nodes never recorded here)."""
    from fedcrm.deploy.certs import public_key_fingerprint
    from fedcrm.fl.registry import NodeRegistry

    try:
        fingerprint = public_key_fingerprint(public_key) if public_key is not None else None
        NodeRegistry(registry).record(node_id=node_id, region=region, public_key_sha256=fingerprint)
    except FedcrmError as e:
        exit_with(e)
    out.print(f"node {node_id} registered for region {region} in {registry}")


def print_result(result: DeploymentResult) -> None:
    """A deployed run's outcome; exit status 2 when it did not complete."""
    status = result.status.get("status", "?")
    if not result.completed:
        console.print(
            f"[bold red]run {result.run_id} {status}[/]: {result.status.get('status-details', '')} "
            f"(logs in {result.workdir / 'logs'})"
        )
        raise typer.Exit(EXIT_USAGE)
    out.print(f"run {result.run_id} {status}")
    if result.summary is not None:
        fm = result.summary.final_metrics
        out.print("final pooled metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in fm.items() if isinstance(v, float)))
        for kind, reasons in result.summary.event_reasons().items():
            for region, why in reasons.items():
                out.print(f"  region {region} {kind}: {why}")
    out.print(f"Results in [bold]{result.run_dir}[/]: summary.json, metrics.jsonl, model/, checkpoints/")


@deploy_app.command("local")
def deploy_local_cmd(
    config: Annotated[Path, typer.Option("--config", help="Experiment config (YAML), e.g. configs/demo.yaml.")],
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Certificates, Flower homes, logs and split data of this deployment.")
    ] = Path(".fedcrm/deploy"),
    state: DeployStateOpt = Path("state"),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: OUTPUT_DIR/NAME from the config).")
    ] = None,
    app_dir: AppOpt = None,
    timeout: Annotated[float, typer.Option(help="Give up (and stop the run) after this many seconds.")] = 3600.0,
) -> None:
    """Run CONFIG on a real SuperLink and one SuperNode per region, all on 127.0.0.1, over TLS.

    Each SuperNode gets its region, data file, state folder and policy from its own --node-config, as a
    data owner sets it; the server never sends a path. Progress is streamed; when the run ends (or on
    Ctrl-C) every process started here is stopped. Logs: WORKDIR/logs/.
    """
    from fedcrm.deploy.local import deploy_local

    try:
        result = deploy_local(
            config,
            workdir=workdir,
            state_root=state,
            run_dir=out_dir,
            app_dir=app_dir,
            report=lambda line: console.print(line, markup=False, highlight=False),
            run_timeout_s=timeout,
        )
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted:[/] every process of the deployment was stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except FedcrmError as e:
        exit_with(e)
    print_result(result)


NameOpt = Annotated[str, typer.Option("--name", help="The deployment's name (its folder: .fedcrm/deployments/NAME).")]
FolderOpt = Annotated[
    Path | None, typer.Option("--workdir", help="The deployment's folder, instead of .fedcrm/deployments/NAME.")
]


def _report(line: str) -> None:
    console.print(line, markup=False, highlight=False)


@deploy_app.command("up")
def deploy_up_cmd(
    config: Annotated[Path, typer.Option("--config", help="Experiment config (YAML) whose regions to serve.")],
    name: NameOpt = "default",
    workdir: FolderOpt = None,
    state: DeployStateOpt = Path("state"),
    app_dir: AppOpt = None,
    public_address: Annotated[
        str | None,
        typer.Option(
            "--public-address",
            help="HOST:PORT where the regions connect: an nginx proxy there forwards the Fleet API only "
            "(the SuperLink's Control API shares its port in Flower 1.42).",
        ),
    ] = None,
    operator_address: Annotated[
        str,
        typer.Option(
            "--operator-address", help="Comma-separated IPs/CIDRs allowed the Control and Runtime APIs via the proxy."
        ),
    ] = "127.0.0.1",
) -> None:
    """Start a SuperLink and one SuperNode per region on 127.0.0.1 (TLS) and leave them running.

    Runs are then submitted with `fedcrm run CONFIG --federation NAME`. Pids, ports, logs and
    federation.json go to the deployment folder. On a deployment that is up, restarts only the SuperNodes
    that are not running. With --public-address the SuperNodes connect through the Fleet-only proxy.
    """
    from fedcrm.deploy.federation import deployment_folder, up
    from fedcrm.deploy.proxy import ProxySettings

    try:
        proxy = (
            ProxySettings.parse(public_address, operators=_split(operator_address))
            if public_address is not None
            else None
        )
        up(
            config,
            folder=deployment_folder(name, workdir=workdir),
            name=name,
            state_root=state,
            app_dir=app_dir,
            report=_report,
            proxy=proxy,
        )
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted:[/] every process started here was stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except FedcrmError as e:
        exit_with(e)


@deploy_app.command("status")
def deploy_status_cmd(
    name: NameOpt = "default",
    workdir: FolderOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as one JSON document.")] = False,
) -> None:
    """Each process of the deployment (pid, running) and each region's node as the SuperLink sees it.

    Exit status 1 when a process is down or a node is not online.
    """
    import json

    from fedcrm.deploy.federation import deployment_folder, status

    try:
        st = status(deployment_folder(name, workdir=workdir))
    except FedcrmError as e:
        exit_with(e)
    if as_json:
        out.print_json(json.dumps(st))
    else:
        out.print(f"federation {st['name']} on {st['address']} ({st['folder']})", highlight=False)
        for key, p in st["processes"].items():
            out.print(f"  {key:<24} pid {p['pid']:<8} {'running' if p['alive'] else '[bold red]DOWN[/]'}")
        for region, n in st["nodes"].items():
            out.print(f"  region {region:<17} node {n['node_id']} {n['status']}")
        if "error" in st:
            out.print(f"  [bold red]SuperLink:[/] {st['error']}")
    if not st["ok"]:
        raise typer.Exit(EXIT_CHECK_FAILED)


@deploy_app.command("down")
def deploy_down_cmd(name: NameOpt = "default", workdir: FolderOpt = None) -> None:
    """Stop the processes `deploy up` started (checked by pid, start time and command line); idempotent."""
    from fedcrm.deploy.federation import deployment_folder, down

    try:
        down(deployment_folder(name, workdir=workdir), report=_report)
    except FedcrmError as e:
        exit_with(e)


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
    app.add_typer(deploy_app, name="deploy")
