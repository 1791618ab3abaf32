"""``fedcrm data validate|split|synth``: customer tables checked against a schema, split into regions, generated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedcrm.commands.common import HELP_OPTIONS, exit_with, out
from fedcrm.errors import FedcrmError

data_app = typer.Typer(
    context_settings=HELP_OPTIONS,
    help="Customer tables: validate against a schema, split into regions, generate synthetic data.",
    no_args_is_help=True,
)


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet table to check.")],
    schema: Annotated[Path, typer.Option(help="Declared schema (YAML), e.g. configs/schemas/telco_churn.yaml.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    delimiter: Annotated[
        str | None,
        typer.Option(
            help="The file's CSV delimiter, as the region's config fixes it (default: the schema's, else detected)."
        ),
    ] = None,
) -> None:
    """Check a customer table against its schema and print what was read, repaired and dropped.

    Exits non-zero (2) when the table has errors: a missing column, an unparseable number, a label
    outside the declared spellings, duplicate ids, an empty table, a file that is not a table.
    Out-of-bounds numbers and unknown categories are not errors: they are clipped or mapped to an
    "(other)" bucket, and counted here.
    """
    from fedcrm.data.io import load_table
    from fedcrm.data.schema import load_schema

    try:
        table = load_table(file, load_schema(schema), delimiter=delimiter)
    except FedcrmError as e:
        exit_with(e)
    report = table.report.as_dict()
    if as_json:
        out.print_json(json.dumps(report))
        return
    sources = {"region": "as given", "schema": "the schema's", "detected": "detected"}
    whose = sources.get(str(report.get("delimiter_from")))
    read_as = f", read with delimiter {report['delimiter']!r} ({whose})" if report.get("delimiter") else ""
    out.print(f"[bold]{file}[/]: {report['rows_read']} rows read, {report['rows_kept']} kept{read_as}", highlight=False)
    for why, n in report["rows_dropped"].items():
        out.print(f"  dropped {n} rows: {why}")
    t = Table("column", "issue", "rows")
    for col, issues in report["columns"].items():
        for issue, n in issues.items():
            t.add_row(
                col,
                issue.replace("_", " "),
                str(n if not isinstance(n, dict) else sum(n.values()))
                + (f"  {dict(list(n.items())[:5])}" if isinstance(n, dict) else ""),
            )
    if report["columns"]:
        out.print(t)
    else:
        out.print("  no value needed repair")


@data_app.command("split")
def data_split(
    schema: Annotated[Path, typer.Option(help="Declared schema of the input table.")],
    input: Annotated[Path, typer.Option("--input", help="The whole table to split.")],
    regions: Annotated[str, typer.Option(help="Comma-separated region names, e.g. eu,us,apac.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for one file per region and manifest.json.")],
    by: Annotated[
        str,
        typer.Option(
            help="hash (seeded hash of the customer id), column:NAME (the value of a "
            "column names the region), or dirichlet:ALPHA (label-skewed; small ALPHA = "
            "more skew)."
        ),
    ] = "hash",
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
) -> None:
    """Split one customer table into regions, reproducibly; no customer lands in two regions."""
    from fedcrm.data.schema import load_schema
    from fedcrm.data.split import SplitMethod, split_table

    try:
        manifest = split_table(
            schema=load_schema(schema),
            input_path=input,
            regions=[r.strip() for r in regions.split(",") if r.strip()],
            method=SplitMethod.parse(by),
            seed=seed,
            out_dir=out_dir,
        )
    except FedcrmError as e:
        exit_with(e)
    for name, r in manifest["regions"].items():
        out.print(f"  {name}: {r['rows']} customers, label rate {r['label_rate']:.3f} -> {out_dir / r['file']}")


@data_app.command("synth")
def data_synth(
    regions: Annotated[str, typer.Option(help="Number of regions, or comma-separated names.")] = "3",
    customers: Annotated[str, typer.Option(help="Customers per region (one number, or one per region).")] = "5000",
    seed: Annotated[int, typer.Option()] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("data/synthetic"),
) -> None:
    """Generate multi-region CRM tables with a known ground-truth churn model (schema synthetic_crm)."""
    from fedcrm.data.synthetic import generate

    names: Any = int(regions) if regions.isdigit() else [r.strip() for r in regions.split(",")]
    counts: Any = int(customers) if customers.isdigit() else [int(c) for c in customers.split(",")]
    try:
        manifest = generate(regions=names, customers=counts, seed=seed, out_dir=out_dir)
    except FedcrmError as e:
        exit_with(e)
    out.print(
        f"{manifest.rows} customers in {len(manifest.regions)} regions, churn rate "
        f"{manifest.label_rate:.3f} -> {out_dir}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
