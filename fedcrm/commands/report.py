"""``fedcrm report``: an HTML page (plots embedded) and a Markdown twin for a run or a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.commands.common import console, exit_with
from fedcrm.errors import FedcrmError


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        path: Annotated[Path, typer.Argument(help="A run folder (summary.json) or a sweep folder (results table).")],
    ) -> None:
        """Write report.html (self-contained) and report.md; for a run also its model_card.md."""
        from fedcrm.report import write_report

        try:
            html_path, md_path = write_report(path)
        except FedcrmError as e:
            exit_with(e)
        console.print(f"{html_path}\n{md_path}")
        if (path / "model_card.md").exists():
            console.print(str(path / "model_card.md"))
