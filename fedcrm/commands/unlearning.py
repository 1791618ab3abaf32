"""Right to erasure: ``fedcrm forget`` at the data owner's side, ``fedcrm retrain RUN_DIR`` to serve it.

``forget`` tombstones the customers at their region and marks the constituents of the given runs that
trained on them stale; ``retrain`` retrains only those constituents (in simulation, federatedly, with the
same config and seeds), deletes the old weights and writes receipts. See docs/erasure.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcrm.errors import FedcrmError, UnlearningError

StateOpt = Annotated[
    Path,
    typer.Option("--state", help="Folder holding every region's state; the region's is STATE/REGION."),
]


def _fail(e: Exception) -> None:
    from fedcrm.cli import console

    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def read_id_file(path: Path) -> list[str]:
    """One id per line; blank lines and lines starting with # are skipped."""
    if not path.exists():
        raise UnlearningError(f"--file {path}: not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def forget_customers(
    *,
    region: str,
    customer_ids: list[str],
    state_root: Path,
    runs: list[Path],
    data: Path | None = None,
    schema: Path | None = None,
    actor: str | None = None,
) -> list[Any]:
    """Library form of ``fedcrm forget`` (without ``--retrain``): returns the erasure requests."""
    from fedcrm.data.io import load_table
    from fedcrm.data.schema import load_schema
    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.unlearning.erasure import forget
    from fedcrm.unlearning.retrain import load_run_config, run_view

    if data is None or schema is None:
        if not runs:
            raise UnlearningError("give --run RUN_DIR (the region's table and schema come from its config), "
                                  "or both --data and --schema")
        cfg = load_run_config(runs[0])
        if region not in cfg.regions:
            raise UnlearningError(f"{runs[0]}: region {region} is not one of the run's regions {sorted(cfg.regions)}")
        data = data or Path(cfg.regions[region])
        schema = schema or cfg.schema_path
    table_ids = load_table(data, load_schema(schema)).ids
    views = [run_view(r, region=region, state_root=state_root) for r in runs]
    requests = forget(state_dir=state_root / region, region=region, customer_ids=customer_ids,
                      table_ids=table_ids, runs=views, actor=operator_actor(actor))
    _remove_from_run_copies(region=region, customer_ids=customer_ids, runs=runs)
    return requests


def _remove_from_run_copies(*, region: str, customer_ids: list[str], runs: list[Path]) -> None:
    """Delete the customers' rows from region files that fedcrm itself made inside a run folder.

    A ``split:`` config writes the regions' tables into RUN_DIR/regions/; those copies are fedcrm's,
    not the data owner's, and a forgotten customer's row must not stay in the run folder. Tables the
    data owner keeps elsewhere are theirs to edit: tombstones keep the customer out of training.
    """
    from fedcrm.data.schema import load_schema
    from fedcrm.data.split import remove_customers
    from fedcrm.unlearning.retrain import load_run_config

    ids = {str(i).strip() for i in customer_ids}
    for run in runs:
        cfg = load_run_config(run)
        path = Path(cfg.regions[region]).resolve()
        if cfg.split is not None and path.is_relative_to(Path(run).resolve()) and path.exists():
            remove_customers(path, schema=load_schema(cfg.schema_path), customer_ids=ids)


def retrain_run(run_dir: Path, *, state_root: Path, report: Any = print) -> Any:
    """Library form of ``fedcrm retrain``: the retrain runs in Flower's simulation on this machine."""
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.unlearning.retrain import retrain

    return retrain(run_dir, state_root=state_root, simulate=run_simulated, report=report)


def served_lines(request: Any) -> list[str]:
    """How each run serves the request, in words: by exclusion at version N, waiting for a retrain, or not
    trained on the customer."""
    lines = []
    for key, r in request.runs.items():
        name = Path(key).name
        if r.status == "excluded":
            lines.append(f"{name}: served by exclusion at version {r.excluded_at_version} (constituent {r.shard} of "
                         f"{r.shards} no longer served, its weights and checkpoints destroyed); a retrain restores it")
        elif r.status == "pending":
            why = ("the run has a single constituent (unlearning.shards = 1): nothing to fall back on"
                   if r.shards == 1 else "no other constituent is served")
            lines.append(f"{name}: shard {r.shard} of {r.shards} stale; {why}, so it is served by retrain: the "
                         "customer stays in the served model until then")
        else:
            lines.append(f"{name}: {r.status}")
    return lines


def print_served(request: Any) -> None:
    from fedcrm.cli import out

    for line in served_lines(request):
        out.print(f"  {request.request_id}: {line}", highlight=False)


def _print_receipts(receipts: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from fedcrm.cli import out

    if not receipts:
        return
    t = Table("request", "region", "customer (salted hash)", "shard", "version", "status", "ε before -> after")
    for receipt in receipts:
        for r in receipt["runs"]:
            p = r.get("privacy") or {}
            eps = "-" if p.get("epsilon_after") is None else f"{p['epsilon_before']:.3f} -> {p['epsilon_after']:.3f}"
            ver = f"{r.get('model_version_before')} -> {r.get('model_version_after') or '?'}"
            t.add_row(receipt["request_id"], receipt["region"], (receipt.get("customer_ref") or "")[:16] + "…",
                      str(r.get("shard")), ver, r["status"], eps)
    out.print(t)


def _retrain_and_print(run_dir: Path, state_root: Path) -> None:
    from fedcrm.cli import console, out

    result = retrain_run(run_dir, state_root=state_root, report=lambda s: console.print(s))
    if not result.stale:
        out.print(f"{run_dir}: no erasure is pending; model version {result.model_version} stays served")
        return
    out.print(f"{run_dir}: shard(s) {result.stale} retrained"
              + (" (resumed from a finished retrain)" if result.resumed else "")
              + f"; model version {result.model_version} is served; old constituent weights and checkpoints "
              "overwritten and deleted")
    _print_receipts(result.receipts)
    out.print(f"Receipts in [bold]{run_dir / 'receipts'}[/], history in [bold]{run_dir / 'erasures.jsonl'}[/]")


def register(app: typer.Typer) -> None:
    @app.command("forget")
    def forget_cmd(
        region: Annotated[str, typer.Option("--region", help="The region holding the customers.")],
        customer_id: Annotated[
            list[str] | None, typer.Option("--customer-id", help="A customer id as the table spells it (repeatable).")
        ] = None,
        file: Annotated[Path | None, typer.Option("--file", help="A file of customer ids, one per line.")] = None,
        run: Annotated[
            list[Path] | None,
            typer.Option("--run", help="A run folder whose model trained on this region's data (repeatable): "
                         "its constituents that trained on the customers are marked stale."),
        ] = None,
        do_retrain: Annotated[bool, typer.Option("--retrain", help="Retrain the stale constituents now.")] = False,
        state: StateOpt = Path("state"),
        data: Annotated[Path | None, typer.Option("--data", help="The region's table (default: from --run).")] = None,
        schema: Annotated[Path | None, typer.Option("--schema", help="Its schema (default: from --run).")] = None,
        operator: Annotated[str | None, typer.Option("--operator", help="Who asks, for the audit log.")] = None,
    ) -> None:
        """Forget customers at their region (GDPR Art. 17, CCPA deletion).

        Every id is checked against the region's table first: an unknown id or one already forgotten
        refuses the whole request and changes nothing. Then the customers are tombstoned (a later
        re-import of the table does not bring them back) and each run's constituents that trained on them
        are marked stale; `fedcrm retrain RUN_DIR` (or --retrain) retrains those, charged to the ledger.
        """
        from fedcrm.cli import out

        try:
            ids = list(customer_id or []) + (read_id_file(file) if file else [])
            runs = list(run or [])
            requests = forget_customers(region=region, customer_ids=ids, state_root=state, runs=runs, data=data,
                                        schema=schema, actor=operator)
            out.print(f"region [bold]{region}[/]: {len(requests)} customer(s) tombstoned")
            for req in requests:
                print_served(req)
            if not runs:
                out.print("[yellow]warning:[/] no --run given: no model was marked stale. Name every run "
                          "trained on this region's data with --run so its constituents are retrained.")
            if do_retrain:
                for r in runs:
                    _retrain_and_print(r, state)
            elif runs:
                out.print("Serve the erasure with: " + "; ".join(f"fedcrm retrain {r} --state {state}" for r in runs))
        except FedcrmError as e:
            _fail(e)

    @app.command("retrain")
    def retrain_cmd(
        run_dir: Annotated[Path, typer.Argument(help="The run folder whose stale constituents to retrain.")],
        state: StateOpt = Path("state"),
    ) -> None:
        """Serve pending erasures on a run: retrain only the stale constituents, federatedly, same seeds.

        The old constituent weights and the stale shard's checkpoints are overwritten and deleted, the
        run gets a new model version, and every request gets a receipt (RUN_DIR/receipts/,
        RUN_DIR/erasures.jsonl). The retrain is charged to each region's privacy ledger; a region whose
        budget does not allow it refuses, and then nothing changes. After a crash, run it again.
        """
        try:
            _retrain_and_print(run_dir, state)
        except FedcrmError as e:
            _fail(e)
