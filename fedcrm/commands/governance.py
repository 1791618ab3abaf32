"""Data owners' commands: `consent withdraw`, `export`, and `audit verify`.

They run at the region, next to its data and state; each request is recorded in the region's audit
log under the operator's name (``--operator``, else the login name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcrm.commands import audit
from fedcrm.commands.audit import audit_app
from fedcrm.commands.common import DEFAULT_STATE, EXIT_CHECK_FAILED, StateOpt, exit_with, out
from fedcrm.errors import FedcrmError

consent_app = typer.Typer(
    help="Consent per purpose: withdraw a customer's consent to one purpose.", no_args_is_help=True
)

OperatorOpt = Annotated[
    str | None, typer.Option("--operator", help="Who asks, for the audit log (default: the login name).")
]
RegionOpt = Annotated[str, typer.Option("--region", help="The region holding the customer.")]
CustomerOpt = Annotated[str, typer.Option("--customer-id", help="The customer's id as the region's table spells it.")]


@consent_app.command("withdraw")
def consent_withdraw(
    region: RegionOpt,
    customer_id: CustomerOpt,
    purpose: Annotated[str, typer.Option("--purpose", help="The purpose consent is withdrawn from, e.g. churn.")],
    state: StateOpt = DEFAULT_STATE,
    operator: OperatorOpt = None,
    run: Annotated[
        list[Path] | None,
        typer.Option("--run", help="Run folder whose constituent(s) trained on the customer (repeatable)."),
    ] = None,
) -> None:
    """Withdraw a customer's consent to one purpose: served like an erasure for that purpose's models.

    The withdrawal is recorded durably at the region (a keyed hash, never the id) and excludes the
    customer from every later training and evaluation for that purpose, even if a re-imported table
    still says yes. The constituents of the given runs that trained on them are marked stale for the
    next retrain; a receipt is written under STATE/REGION/receipts/.
    """
    from fedcrm.commands.unlearning import print_served
    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.governance.requests import withdraw_consent

    try:
        request = withdraw_consent(
            state_dir=state / region,
            region=region,
            customer_id=customer_id,
            purpose=purpose,
            actor=operator_actor(operator),
            runs=tuple(run or ()),
        )
    except FedcrmError as e:
        exit_with(e)
    out.print(
        f"consent to `{purpose}` withdrawn at region {region} (request {request.request_id}); "
        f"receipt in {state / region / 'receipts'}"
    )
    print_served(request)


def export(
    region: RegionOpt,
    customer_id: CustomerOpt,
    data: Annotated[Path, typer.Option("--data", help="The region's customer table.")],
    schema: Annotated[Path, typer.Option("--schema", help="Its declared schema (YAML).")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the export.")],
    run: Annotated[
        list[Path] | None, typer.Option("--run", help="Run folder whose served model scores the customer (repeatable).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json (default) or csv (the JSON flattened).")] = "json",
    state: StateOpt = DEFAULT_STATE,
    operator: OperatorOpt = None,
) -> None:
    """Write a customer's copy of their data (portability), format fedcrm-customer-export v1.

    Holds their record as stored, the encoded features, consent states, which models and shards their
    data trained, their current score from each run's served model with an explanation, and the
    erasure/consent history. Schema: schemas/export-v1.schema.json. An unknown or forgotten customer is
    an error and no file is written.
    """
    from fedcrm.data.schema import load_schema
    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.governance.export import ExportRequest
    from fedcrm.governance.requests import serve_export

    try:
        request = ExportRequest(
            region=region,
            customer_id=customer_id,
            data_path=data,
            schema=load_schema(schema),
            schema_path=schema,
            state_dir=state / region,
            runs=tuple(run or ()),
        )
        document = serve_export(request, out=out_file, fmt=fmt, actor=operator_actor(operator))
    except FedcrmError as e:
        exit_with(e)
    n = len(document["models"])
    out.print(f"export of customer {customer_id} at region {region} ({n} model(s)) -> {out_file}")


def audit_verify(
    log: Annotated[Path, typer.Argument(help="An audit log (STATE/REGION/audit.log, RUN_DIR/audit.log).")],
    expect_head: Annotated[
        str | None,
        typer.Option(
            "--expect-head",
            help="A head recorded earlier (summary.json's audit_head, a receipt's region_audit_head): fail "
            "unless the log still holds that entry, i.e. was neither cut back nor rewritten since.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
) -> None:
    """Check an audit log's hash chain and print its head: OK, or the first entry altered, removed or
    reordered, or a recorded head the log no longer holds (exit 1)."""
    from fedcrm.governance.audit_log import verify

    if not log.is_file():
        exit_with(
            FedcrmError(f"{log}: no audit log there (regions keep STATE/REGION/audit.log, runs RUN_DIR/audit.log)")
        )
    try:
        report = verify(log, expect_head=expect_head)
    except FedcrmError as e:
        exit_with(e)
    if as_json:
        import dataclasses
        import json

        out.print_json(json.dumps({"log": str(log), **dataclasses.asdict(report)}))
    elif report.ok:
        anchored = ""
        if report.anchored_seq == -1:
            anchored = "; the expected head is the empty log's"
        elif report.anchored_seq is not None:
            since = report.entries - 1 - report.anchored_seq
            anchored = f"; the expected head is entry seq {report.anchored_seq}, {since} entries written since"
        out.print(f"OK: {log}: {report.entries} entries, chain intact{anchored}", highlight=False)
        out.print(f"head: {report.head}", highlight=False)
    else:
        out.print(f"BAD: {report.problem}", highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def register(app: typer.Typer) -> None:
    app.add_typer(consent_app, name="consent")
    app.command("export")(export)
    audit_app.command("verify")(audit_verify)
    audit.register(app)  # the shared `audit` group; attaches once whoever calls first
