"""``fedcrm sweep``: run every cell of a sweep file, resumable, and write the results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedcrm.commands.common import EXIT_CHECK_FAILED, EXIT_USAGE, RayAddressOpt, console, exit_with, out
from fedcrm.errors import FedcrmError


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep(
        spec_path: Annotated[
            Path, typer.Argument(help="Sweep file (YAML), e.g. experiments/epsilon_sweep_telco.yaml.")
        ],
        out_dir: Annotated[
            Path | None, typer.Option("--out", help="Sweep folder (default: OUTPUT_DIR/NAME from the sweep file).")
        ] = None,
        engine: Annotated[
            str | None,
            typer.Option(
                help="shared: one simulation engine runs many cells (start-up paid once); per_cell: "
                "a fresh engine per cell. Default: the sweep file's `engine`."
            ),
        ] = None,
        report: Annotated[bool, typer.Option(help="Write the sweep report (HTML + Markdown) at the end.")] = True,
        ray_address: RayAddressOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the cells' results as one JSON document.")] = False,
    ) -> None:
        """Run a grid of experiments × seeds: one run folder and one state folder per cell.

        Complete cells (summary.json with the cell's config digest) are not rerun; a failing cell is
        recorded with its error and the sweep goes on. Results: results.csv and results.parquet.
        """
        from fedcrm.progress import ProgressBar
        from fedcrm.sweep import load_sweep, run_sweep

        if engine not in (None, "shared", "per_cell"):
            console.print(f"[bold red]error:[/] --engine must be shared or per_cell, got {engine}")
            raise typer.Exit(EXIT_USAGE)
        try:
            spec = load_sweep(spec_path)
            sweep_dir = (out_dir or spec.output_dir / spec.name).resolve()
            with ProgressBar(description=f"sweep {spec.name}: cells", total=None, console=console) as bar:
                df = run_sweep(
                    spec,
                    out_dir=sweep_dir,
                    engine=engine,  # type: ignore[arg-type]  # checked above: shared, per_cell or None
                    report=bar.log,
                    progress=lambda done, total: bar.update(completed=done, total=total),
                    ray_address=ray_address,
                )
            if report:
                from fedcrm.report import write_sweep_report

                html_path, _ = write_sweep_report(sweep_dir)
                console.print(f"report: {html_path}")
        except FedcrmError as e:
            exit_with(e)
        failed = df[df["status"] == "failed"]
        if as_json:
            out.print_json(
                json.dumps(
                    {
                        "sweep_dir": str(sweep_dir),
                        "cells": len(df),
                        "failed": len(failed),
                        "results": json.loads(df.to_json(orient="records")),
                    }
                )
            )
            if len(failed):
                raise typer.Exit(EXIT_CHECK_FAILED)
            return
        out.print(f"{len(df)} cells, {len(df) - len(failed)} done, {len(failed)} failed -> {sweep_dir}/results.csv")
        for _, row in failed.iterrows():
            out.print(f"  [red]failed[/] {escape(str(row['cell']))}: {escape(str(row['error']))}")
        if len(failed):
            raise typer.Exit(EXIT_CHECK_FAILED)
