"""Deployment commands: ``fedcrm certs`` (TLS material and SuperNode keys) and ``fedcrm deploy local``.

``deploy local`` starts, on this machine's loopback only, what a real federation runs on many machines
(docs/deployment.md): a TLS SuperLink with SuperNode authentication, one SuperNode per region, the run
submitted with ``flwr run``; it stops every process it started when the run ends, fails or is
interrupted (Ctrl-C).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedcrm.errors import FedcrmError

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
EXIT_ERROR = 2

deploy_app = typer.Typer(
    help="Run the federation on Flower's deployment engine (SuperLink + one SuperNode per region, TLS).",
    no_args_is_help=True,
)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(EXIT_ERROR)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def certs(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the CA, the SuperLink's TLS files and the keys.")],
    regions: Annotated[str, typer.Option(help="Comma-separated region names: one SuperNode key pair each.")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Name or IP address the SuperLink is reached by (repeat; default localhost and 127.0.0.1).",
        ),
    ] = None,
    valid_days: Annotated[int, typer.Option(help="Validity of the SuperLink's certificate.")] = 365,
) -> None:
    """Create a private CA, the SuperLink's TLS certificate and one SuperNode key pair per region.

    Give ca.crt to every region and to the operator's flwr CLI, server.key/server.crt to the SuperLink,
    supernode-REGION.key to that region only, and register every supernode-REGION.pub on the SuperLink
    (flwr supernode register). Keep ca.key offline. Existing files are never overwritten.
    """
    from fedcrm.deploy.certs import create_certificates

    try:
        bundle = create_certificates(
            out_dir=out_dir,
            regions=_split(regions),
            hosts=tuple(host) if host else ("localhost", "127.0.0.1"),
            valid_days=valid_days,
        )
    except FedcrmError as e:
        _fail(e)
    out.print(f"CA: {bundle.ca_cert} (its key {bundle.ca_key}: keep it offline)")
    out.print(f"SuperLink: {bundle.server_cert}, {bundle.server_key} for {', '.join(bundle.hosts)}")
    for region in bundle.regions:
        out.print(
            f"region {region}: private key {bundle.supernode_private_keys[region]} (to that region only), "
            f"public key {bundle.supernode_public_keys[region]} (register it: flwr supernode register)"
        )


@deploy_app.command("local")
def deploy_local_cmd(
    config: Annotated[Path, typer.Option("--config", help="Experiment config (YAML), e.g. configs/demo.yaml.")],
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Certificates, Flower homes, logs and split data of this deployment.")
    ] = Path(".fedcrm/deploy"),
    state: Annotated[
        Path, typer.Option("--state", help="Every region's state (ledger, tombstones), one sub-folder per region.")
    ] = Path("state"),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: OUTPUT_DIR/NAME from the config).")
    ] = None,
    app_dir: Annotated[
        Path | None, typer.Option("--app", help="Flower app directory (default: this fedcrm source checkout).")
    ] = None,
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
        raise typer.Exit(130) from None
    except FedcrmError as e:
        _fail(e)
    status = result.status.get("status", "?")
    if not result.completed:
        console.print(
            f"[bold red]run {result.run_id} {status}[/]: {result.status.get('status-details', '')} "
            f"(logs in {result.workdir / 'logs'})"
        )
        raise typer.Exit(EXIT_ERROR)
    out.print(f"run {result.run_id} {status}")
    if result.summary is not None:
        fm = result.summary.get("final_metrics", {})
        out.print(
            "final pooled metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in fm.items() if isinstance(v, float))
        )
        events = result.summary.get("events", {})
        for kind in ("refused", "failed", "rejected"):
            for region, why in events.get(kind, {}).items():
                out.print(f"  region {region} {kind}: {why}")
    out.print(f"Results in [bold]{result.run_dir}[/]: summary.json, metrics.jsonl, model/, checkpoints/")


def register(app: typer.Typer) -> None:
    app.command("certs")(certs)
    app.add_typer(deploy_app, name="deploy")
