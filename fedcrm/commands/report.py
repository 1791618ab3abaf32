"""``fedcrm report``: an HTML page (plots embedded) and a Markdown twin for a run or a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedcrm.errors import FedcrmError

console = Console(stderr=True, soft_wrap=True)


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
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        console.print(f"{html_path}\n{md_path}")
        if (path / "model_card.md").exists():
            console.print(str(path / "model_card.md"))
