"""``fedcrm score``: the served model scores the region's customers, at the region."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedcrm.commands.common import exit_with, out
from fedcrm.errors import ConfigError, FedcrmError


def score(
    region: Annotated[str, typer.Option("--region", help="Your region (its forgotten customers are never scored).")],
    model: Annotated[Path, typer.Option("--model", help="Run folder holding the served model (RUN_DIR).")],
    out_file: Annotated[Path, typer.Option("--out", help="Where the scores go: a .csv or .parquet file.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Your customer table (default: the region's file in the run).")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option("--schema", help="Declared schema (default: the run's schema).")
    ] = None,
    state: Annotated[
        Path, typer.Option("--state", help="Folder of every region's state; yours is STATE/REGION.")
    ] = Path("state"),
    reasons: Annotated[
        int,
        typer.Option(
            "--reasons",
            min=0,
            help="Also write the N columns that moved each score most, in points (as `fedcrm explain` words them).",
        ),
    ] = 0,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", min=1000, help="Customers read at a time (memory).")] = (
        100_000
    ),
    operator: Annotated[str | None, typer.Option("--operator", help="Who scores, for the audit log.")] = None,
    delimiter: Annotated[
        str | None,
        typer.Option(
            help="Your table's CSV delimiter (default: the run config's for your region, else the schema's, "
            "else detected)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was done as one JSON document.")] = False,
) -> None:
    """Score your region's customers with a run's served model; nothing is sent anywhere.

    The table goes through the run's schema (same checks and errors as training); forgotten customers
    and those without consent to the model's purpose (the table's consent column, or a recorded
    withdrawal) get no score. Writes customer_id, score, model_version (and reason_1..N) to --out, all
    or nothing; the region's audit log records the scoring (counts and model version, no ids).
    """
    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.scoring import ScoringModel, score_region

    try:
        scorer = ScoringModel.load(model, schema=schema)
        data_path = data or scorer.served.region_data(region)
        if data_path is None:
            raise ConfigError(f"the run does not record a data file for region {region}: pass --data")
        delimiter = delimiter or (scorer.served.config.get("region_delimiters") or {}).get(region)
        result = score_region(
            region=region,
            model=scorer,
            data=data_path,
            state_dir=state / region,
            out=out_file,
            reasons=reasons,
            chunk_rows=chunk_rows,
            actor=operator_actor(operator),
            delimiter=delimiter,
        )
    except FedcrmError as e:
        exit_with(e)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    c = result.counts
    out.print(
        f"region [bold]{region}[/]: {c['scored']} of {c['customers_in_table']} customers scored with model version "
        f"{result.model_version} ({result.purpose}); left out: {c['forgotten']} forgotten, "
        f"{c['excluded_no_consent']} without consent -> {result.out}"
    )


def register(app: typer.Typer) -> None:
    app.command("score")(score)
