"""Approving app bundles, and the executors that start a deployment's apps.

``fedcrm bundle keygen|hash|sign`` are for whoever reviews app bundles for a data owner;
``fedcrm region exec`` is what a data owner runs next to their SuperNode (``--isolation process``) so
that only bundles approved in the region's trust file start (docs/deployment.md); ``fedcrm server exec``
is the coordinator's, next to the SuperLink (``--isolation process``): a warm ServerApp per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcrm.commands.common import exit_with, out
from fedcrm.errors import FedcrmError

bundle_app = typer.Typer(help="Review and approve app bundles (what `flwr run` ships to the regions).",
                         no_args_is_help=True)  # fmt: skip
region_app = typer.Typer(help="Run a region's side of a deployment.", no_args_is_help=True)
server_app = typer.Typer(help="Run the coordinator's side of a deployment.", no_args_is_help=True)


@bundle_app.command("keygen")
def keygen(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for bundle-signer-NAME.key/.pub.")],
    name: Annotated[str, typer.Option(help="The signer's name, as data owners will list it.")],
) -> None:
    """Create an Ed25519 key pair for approving bundles; give the .pub to the data owners who trust you."""
    from fedcrm.deploy.certs import create_bundle_signing_key

    try:
        key, pub = create_bundle_signing_key(out_dir=out_dir, name=name)
    except FedcrmError as e:
        exit_with(e)
    out.print(f"private key {key} (keep it with the reviewer); public key {pub} (for trusted_signers)")


@bundle_app.command("hash")
def bundle_hash(app: Annotated[Path, typer.Argument(help="The Flower app folder `flwr run` would submit.")]) -> None:
    """Print the SHA-256 of the bundle built from APP (what a region's approved_bundles lists)."""
    from fedcrm.deploy.approval import bundle_digest
    from fedcrm.deploy.bundle import build_bundle

    out.print(bundle_digest(build_bundle(app)))


@bundle_app.command("sign")
def sign(
    app: Annotated[Path, typer.Argument(help="The Flower app folder you reviewed.")],
    key: Annotated[Path, typer.Option("--key", help="Your bundle-signer-NAME.key.")],
) -> None:
    """Approve the bundle built from APP: print its hash and the signature to submit it with.

    Submit with `flwr run APP ... --run-config 'bundle-signature="SIGNATURE"'`: any change to APP
    changes the hash, and the regions refuse it.
    """
    from fedcrm.deploy.approval import SIGNATURE_KEY, bundle_digest, sign_bundle
    from fedcrm.deploy.bundle import build_bundle

    try:
        digest = bundle_digest(build_bundle(app))
        signature = sign_bundle(digest=digest, private_key=key)
    except FedcrmError as e:
        exit_with(e)
    out.print(f"sha256 {digest}")
    out.print(f'{SIGNATURE_KEY}="{signature}"', markup=False, highlight=False)


InsecureOpt = Annotated[bool, typer.Option("--insecure", help="The Runtime API without TLS (loopback only).")]
RootCertsOpt = Annotated[
    Path | None, typer.Option("--root-certificates", help="CA of the Runtime API's TLS certificate.")
]
ParentPidOpt = Annotated[int | None, typer.Option("--parent-pid", help="Stop when this process ends.")]


def _spawn_opt(what: str) -> Any:
    return typer.Option(
        "--spawn",
        help=f"Start each {what} as a fresh Python process (seconds of imports each) instead of a fork of this "
        "one, which imports torch and fedcrm once at start.",
    )


def _tls(insecure: bool, root_certificates: Path | None) -> str | None:
    if not insecure and root_certificates is None:
        exit_with(FedcrmError("give --root-certificates for a TLS Runtime API, or --insecure on loopback"))
    return str(root_certificates) if root_certificates else None


@region_app.command("exec")
def region_exec(
    runtime_api_address: Annotated[
        str, typer.Option("--runtime-api-address", help="Your SuperNode's Runtime API (its --host:--port).")
    ],
    trust: Annotated[Path, typer.Option("--trust", help="Your trust file: approved_bundles, trusted_signers.")],
    insecure: InsecureOpt = False,
    root_certificates: RootCertsOpt = None,
    parent_pid: ParentPidOpt = None,
    spawn: Annotated[bool, _spawn_opt("message's ClientApp")] = False,
) -> None:
    """Start your region's ClientApps, each only after its bundle passed your trust file.

    Run next to `flower-supernode --isolation process`: it replaces Flower's SuperExec for your node.
    A refused bundle gets an error reply naming the reason; the details go to this process's log.
    Each message's ClientApp is a fork of this process (its libraries imported once), unless --spawn.
    """
    from fedcrm.deploy.gate import run_region_exec

    certs = _tls(insecure, root_certificates)
    try:
        run_region_exec(runtime_api_address=runtime_api_address, trust_path=trust, insecure=insecure,
                        root_certificates=certs, parent_pid=parent_pid, spawn=spawn)  # fmt: skip
    except FedcrmError as e:
        exit_with(e)


@server_app.command("exec")
def server_exec(
    runtime_api_address: Annotated[
        str, typer.Option("--runtime-api-address", help="The SuperLink's Runtime API (its --host:--port).")
    ],
    insecure: InsecureOpt = False,
    root_certificates: RootCertsOpt = None,
    parent_pid: ParentPidOpt = None,
    spawn: Annotated[bool, _spawn_opt("run's ServerApp")] = False,
) -> None:
    """Start each run's ServerApp, warm: a fork of this process, which imported Flower and fedcrm once.

    Run next to `flower-superlink --isolation process`, with the SuperLink's FLWR_HOME: it replaces the
    SuperExec that `--isolation subprocess` starts, so that a run starts without waiting for a new
    interpreter's imports.
    """
    from fedcrm.deploy.server_exec import run_server_exec

    certs = _tls(insecure, root_certificates)
    run_server_exec(runtime_api_address=runtime_api_address, insecure=insecure, root_certificates=certs,
                    parent_pid=parent_pid, spawn=spawn)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(region_app, name="region")
    app.add_typer(server_app, name="server")
