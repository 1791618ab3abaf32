"""The ``fedcrm audit`` command group, shared by the modules that add audits to it.

Created once here so that every topic module (``trust``: ``audit privacy``; ``governance``:
``audit verify``) attaches its command to the same group; ``fedcrm.cli`` calls :func:`register` once.
"""

from __future__ import annotations

import typer

audit_app = typer.Typer(
    help="Audits: check a run's privacy empirically, verify the hash-chained audit log.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Attach the ``audit`` group to the main app; safe to call from every module that uses it."""
    if not any(g.typer_instance is audit_app for g in app.registered_groups):
        app.add_typer(audit_app, name="audit")
