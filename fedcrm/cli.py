"""The ``fedcrm`` command line: the app, its ``--version``, and every command module registered on it.

What each command does lives in :mod:`fedcrm.commands` (one module per topic, each with ``register(app)``);
what they share (consoles, failure, exit codes, shared options) in :mod:`fedcrm.commands.common`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fedcrm.commands import budget, bundle, data, deploy, governance, report, run, score, sweep, trust, unlearning
from fedcrm.commands.common import EXIT_INTERRUPTED, HELP_OPTIONS, console, out

app = typer.Typer(
    context_settings=HELP_OPTIONS,
    help="fedcrm: train customer models (churn, propensity) across regions without moving customer data, "
    "with differential privacy, an exact privacy ledger and erasure by retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from fedcrm import __version__

        out.print(f"fedcrm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print fedcrm's version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 privacy refusal, 130 interrupted."""


# The order of registration is the order of `fedcrm --help`.
for _module in (data, run, budget, governance, trust, sweep, report, unlearning, deploy, bundle, score):
    _module.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
