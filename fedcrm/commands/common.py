"""What every ``fedcrm`` command shares: its consoles, exit codes, how an error ends a command, shared options.

Exit codes (documented in the README; scripts may rely on them):

====  ==========================================================================================
0     ok
1     a check ran and failed (``audit verify`` found a broken chain)
2     usage or input error: a bad option, config, schema, table, missing file, damaged state
3     privacy refusal: a budget, policy or consent refuses the request, or a privacy audit failed
130   interrupted (Ctrl-C)
====  ==========================================================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fedcrm.errors import FederationRefused, PolicyError, PrivacyBudgetError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_PRIVACY_REFUSAL = 3
EXIT_INTERRUPTED = 130

# Logs and errors go to stderr, so that stdout holds only what a command reports (one JSON with --json).
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # inherited by every group and command

DEFAULT_STATE = Path("state")
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="FEDCRM_RAY_ADDRESS",
        help="Run the simulation's ClientApps on this running Ray cluster (HOST:PORT of its head, as "
        "`ray start --head` prints) instead of starting Ray here: one ClientApp per CPU of every node. "
        "Every node must see the regions' data files and the fedcrm install (docs/deployment.md).",
    ),
]
StateOpt = Annotated[
    Path,
    typer.Option(
        "--state",
        help="Folder holding every region's state (privacy ledger, tombstones, secrets); the region's is "
        "STATE/REGION. In simulation: one sub-folder per region.",
    ),
]


def progress(line: str) -> None:
    """A progress line as written: region names or reasons are not rich markup."""
    console.print(line, markup=False, highlight=False)


def exit_code(error: Exception) -> int:
    """The exit code for a fedcrm error: a privacy refusal (3), the regions' included, or a usage/input error (2)."""
    refusal = PrivacyBudgetError | PolicyError | FederationRefused
    return EXIT_PRIVACY_REFUSAL if isinstance(error, refusal) else EXIT_USAGE


def error_document(error: Exception, **details: object) -> dict[str, object]:
    """What a failed ``--json`` command prints on stdout: the error's kind, message and exit code."""
    return {"error": {"kind": type(error).__name__, "message": str(error), "exit_code": exit_code(error), **details}}


def exit_with(error: Exception, *, as_json: bool = False, **details: object) -> NoReturn:
    """Print the error on stderr and end the command with its exit code; with ``as_json`` stdout gets
    the error document too, so a script reading one JSON document from stdout reads why it failed."""
    console.print(f"[bold red]error:[/] {escape(str(error))}")
    if as_json:
        out.print_json(json.dumps(error_document(error, **details), default=str))
    raise typer.Exit(exit_code(error))
