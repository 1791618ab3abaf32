"""Right to erasure: ``fedcrm forget`` at the data owner's side, ``fedcrm retrain RUN_DIR`` to serve it.

``forget`` tombstones the customers at their region and marks the constituents of the given runs that
trained on them stale; ``retrain`` retrains only those constituents (in simulation, federatedly, with the
same config and seeds), deletes the old weights and writes receipts. See docs/erasure.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedcrm.commands.common import DEFAULT_STATE, StateOpt, console, exit_with, out
from fedcrm.errors import FedcrmError, UnlearningError


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
            raise UnlearningError(
                "give --run RUN_DIR (the region's table and schema come from its config), or both --data and --schema"
            )
        cfg = load_run_config(runs[0])
        if region not in cfg.regions:
            raise UnlearningError(f"{runs[0]}: region {region} is not one of the run's regions {sorted(cfg.regions)}")
        data = data or Path(cfg.regions[region])
        schema = schema or cfg.schema_path
    table_ids = load_table(data, load_schema(schema)).ids
    views = [run_view(r, region=region, state_root=state_root) for r in runs]
    policy = region_policy(runs[0] if runs else None, region=region)
    requests = forget(
        state_dir=state_root / region,
        region=region,
        customer_ids=customer_ids,
        table_ids=table_ids,
        runs=views,
        actor=operator_actor(actor),
        deadline_days=policy.erasure_deadline_days,
    )
    _remove_from_run_copies(region=region, customer_ids=customer_ids, runs=runs)
    return requests


def region_policy(run_dir: Path | None, *, region: str, policy: Path | None = None) -> Any:
    """The region's policy: the file given, else the one the run's config names for the region."""
    from fedcrm.governance.policy import load_policy
    from fedcrm.unlearning.retrain import load_run_config

    if policy is None and run_dir is not None:
        policy = (getattr(load_run_config(run_dir), "policies", {}) or {}).get(region)
    return load_policy(policy)


def retrain_affordability(run_dir: Path, *, region: str, state_root: Path, shards: set[int]) -> list[str]:
    """Per stale shard: whether the region's budget affords the retrain that restores it, in words."""
    from fedcrm.privacy.ledger import PrivacyLedger
    from fedcrm.unlearning.budget import retrain_budget
    from fedcrm.unlearning.retrain import load_run_config, run_delta

    cfg = load_run_config(run_dir)
    if cfg.privacy.mode == "none" or not (state_root / region / "privacy_ledger.sqlite").exists():
        return [f"{Path(run_dir).name}: no DP ledger for region {region}: a retrain costs no ε"]
    ledger = PrivacyLedger.open(state_root / region, region=region)
    budget = region_policy(run_dir, region=region).privacy_budget
    lines = []
    for k in sorted(shards):
        b = retrain_budget(
            ledger, shard=k, budget=budget, delta=run_delta(Path(run_dir), cfg), accountant=cfg.privacy.accountant
        )
        if b.epsilon_after_one is None:
            continue
        verdict = (
            f"affordable ({b.retrains_left} retrain(s) left under the budget {budget:g})"
            if b.affordable
            else f"NOT affordable under the budget {budget:g}: the erasure stays served by exclusion"
        )
        lines.append(
            f"{Path(run_dir).name}: retrain of shard {k}: ε {b.epsilon_now:.3f} -> {b.epsilon_after_one:.3f}, {verdict}"
        )
    return lines


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


def retrain_run(run_dir: Path, *, state_root: Path, report: Any = print, federation: str | None = None) -> Any:
    """Library form of ``fedcrm retrain``: the retrain runs in Flower's simulation on this machine, or on
    the running federation ``federation`` (``fedcrm deploy up``), whose regions keep their state in
    ``state_root``."""
    from fedcrm.unlearning.retrain import retrain

    if federation is not None:
        from fedcrm.deploy.federation import deployment_folder, retrain_on

        return retrain(
            run_dir, state_root=state_root, simulate=retrain_on(deployment_folder(federation)), report=report
        )
    from fedcrm.fl.simulation import run_simulated

    return retrain(run_dir, state_root=state_root, simulate=run_simulated, report=report)


def served_lines(request: Any) -> list[str]:
    """How each run serves the request, in words: by exclusion at version N, waiting for a retrain, or not
    trained on the customer."""
    lines = []
    for key, r in request.runs.items():
        name = Path(key).name
        if r.status == "excluded":
            lines.append(
                f"{name}: served by exclusion at version {r.excluded_at_version} (constituent {r.shard} of "
                f"{r.shards} no longer served, its weights and checkpoints destroyed); a retrain restores it"
            )
        elif r.status == "pending":
            why = (
                "the run has a single constituent (unlearning.shards = 1): nothing to fall back on"
                if r.shards == 1
                else "no other constituent is served"
            )
            lines.append(
                f"{name}: shard {r.shard} of {r.shards} stale; {why}, so it is served by retrain: the "
                "customer stays in the served model until then"
            )
        else:
            lines.append(f"{name}: {r.status}")
    return lines


def print_served(request: Any) -> None:

    for line in served_lines(request):
        out.print(f"  {request.request_id}: {line}", highlight=False)


def _print_receipts(receipts: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not receipts:
        return
    t = Table("request", "region", "customer (keyed hash)", "shard", "version", "status", "ε before -> after")
    for receipt in receipts:
        for r in receipt["runs"]:
            p = r.get("privacy") or {}
            eps = "-" if p.get("epsilon_after") is None else f"{p['epsilon_before']:.3f} -> {p['epsilon_after']:.3f}"
            ver = f"{r.get('model_version_before')} -> {r.get('model_version_after') or '?'}"
            t.add_row(
                receipt["request_id"],
                receipt["region"],
                (receipt.get("customer_ref") or "")[:16] + "…",
                str(r.get("shard")),
                ver,
                r["status"],
                eps,
            )
    out.print(t)


def _retrain_and_print(
    run_dir: Path, state_root: Path, *, as_json: bool = False, federation: str | None = None
) -> None:
    import json

    from fedcrm.progress import ProgressBar, counting_rounds

    with ProgressBar(description=f"retrain {run_dir.name}: rounds", total=None, console=console) as bar:
        result = retrain_run(run_dir, state_root=state_root, report=counting_rounds(bar), federation=federation)
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "run_dir": str(run_dir),
                    "stale": result.stale,
                    "model_version": result.model_version,
                    "resumed": result.resumed,
                    "receipts": result.receipts,
                    "warnings": result.warnings,
                },
                default=str,
            )
        )
        return
    if not result.stale:
        out.print(f"{run_dir}: no erasure is pending; model version {result.model_version} stays served")
        return
    out.print(
        f"{run_dir}: shard(s) {result.stale} retrained"
        + (" (resumed from a finished retrain)" if result.resumed else "")
        + f"; model version {result.model_version} is served; old constituent weights and checkpoints "
        "overwritten and deleted"
    )
    _print_receipts(result.receipts)
    out.print(f"Receipts in [bold]{run_dir / 'receipts'}[/], history in [bold]{run_dir / 'erasures.jsonl'}[/]")


erasures_app = typer.Typer(
    help="Erasure and consent-withdrawal requests at a region: deadlines, how served.", no_args_is_help=True
)


@erasures_app.command("status")
def erasures_status(
    region: Annotated[str, typer.Option("--region", help="The region whose requests to list.")],
    state: StateOpt = DEFAULT_STATE,
    policy: Annotated[Path | None, typer.Option("--policy", help="The region's policy (budget, deadline).")] = None,
    accountant: Annotated[str | None, typer.Option(help="rdp or prv; default: the policy's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    operator: Annotated[str | None, typer.Option("--operator", help="Who checks, for the audit log.")] = None,
) -> None:
    """List open requests: days to the deadline, how each is served, the ε a retrain would cost.

    An overdue request (past the deadline and still in a served model) is recorded in the region's
    audit log (`erasure_overdue`) and the command exits 1.
    """
    import json

    from fedcrm.governance.audit_trail import operator_actor
    from fedcrm.unlearning.deadlines import audit_overdue, open_requests

    try:
        rules = region_policy(None, region=region, policy=policy)
        accountant = accountant or rules.accountant  # the ledger composes as the region's policy says
        # δ is the region's (its policy's), as for every release of its data: a retrain is priced at it.
        found = open_requests(
            state / region, region=region, budget=rules.privacy_budget, delta=rules.delta, accountant=accountant
        )
        overdue = [o for o in found if o.overdue]
        if overdue:
            audit_overdue(state / region, overdue, actor=operator_actor(operator))
    except FedcrmError as e:
        exit_with(e)
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "region": region,
                    "open": [o.as_dict() for o in found],
                    "overdue": [o.request.request_id for o in overdue],
                }
            )
        )
    else:
        if not found:
            out.print(f"region {region}: no open request")
        for o in found:
            late = "[bold red]OVERDUE[/] " if o.overdue else ""
            out.print(
                f"{late}{o.request.request_id} ({o.request.kind}): {o.days_left:.1f} day(s) left "
                f"(deadline {o.request.deadline})"
            )
            for r in o.runs:
                cost = r["retrain"]
                price = (
                    ""
                    if not cost or cost["epsilon_after_one_retrain"] is None
                    else f"; a retrain costs ε {cost['epsilon_now']:.3f} -> {cost['epsilon_after_one_retrain']:.3f} "
                    f"({cost['retrains_left']} left)"
                )
                out.print(f"  {r['run']}: shard {r['shard']} of {r['shards']}: {r['how']}{price}", highlight=False)
    if overdue:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(erasures_app, name="erasures")

    @app.command("forget")
    def forget_cmd(
        region: Annotated[str, typer.Option("--region", help="The region holding the customers.")],
        customer_id: Annotated[
            list[str] | None, typer.Option("--customer-id", help="A customer id as the table spells it (repeatable).")
        ] = None,
        file: Annotated[Path | None, typer.Option("--file", help="A file of customer ids, one per line.")] = None,
        run: Annotated[
            list[Path] | None,
            typer.Option(
                "--run",
                help="A run folder whose model trained on this region's data (repeatable): "
                "its constituents that trained on the customers are marked stale.",
            ),
        ] = None,
        do_retrain: Annotated[bool, typer.Option("--retrain", help="Retrain the stale constituents now.")] = False,
        state: StateOpt = DEFAULT_STATE,
        data: Annotated[Path | None, typer.Option("--data", help="The region's table (default: from --run).")] = None,
        schema: Annotated[Path | None, typer.Option("--schema", help="Its schema (default: from --run).")] = None,
        operator: Annotated[str | None, typer.Option("--operator", help="Who asks, for the audit log.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the requests as one JSON document.")] = False,
    ) -> None:
        """Forget customers at their region (GDPR Art. 17, CCPA deletion).

        Every id is checked against the region's table first: an unknown id or one already forgotten
        refuses the whole request and changes nothing. Then the customers are tombstoned (a later
        re-import of the table does not bring them back) and each run's constituents that trained on them
        are marked stale; `fedcrm retrain RUN_DIR` (or --retrain) retrains those, charged to the ledger.
        """

        try:
            ids = list(customer_id or []) + (read_id_file(file) if file else [])
            runs = list(run or [])
            requests = forget_customers(
                region=region, customer_ids=ids, state_root=state, runs=runs, data=data, schema=schema, actor=operator
            )
            if as_json:
                import json

                out.print_json(
                    json.dumps(
                        {
                            "region": region,
                            "requests": [
                                {
                                    "request_id": req.request_id,
                                    "runs": {
                                        key: {"status": r.status, "shard": r.shard} for key, r in req.runs.items()
                                    },
                                }
                                for req in requests
                            ],
                        }
                    )
                )
                if do_retrain:  # the retrains' progress goes to stderr; stdout keeps the one document
                    for r in runs:
                        retrain_run(r, state_root=state, report=lambda s: None)
                return
            out.print(f"region [bold]{region}[/]: {len(requests)} customer(s) tombstoned")
            for req in requests:
                print_served(req)
            for r in runs:
                stale = {
                    e.shard
                    for q in requests
                    for k, e in q.runs.items()
                    if k == str(r.resolve()) and e.open and e.shard is not None
                }
                for line in retrain_affordability(r, region=region, state_root=state, shards=stale) if stale else []:
                    out.print(f"  {line}", highlight=False)
            if not runs:
                out.print(
                    "[yellow]warning:[/] no --run given: no model was marked stale. Name every run "
                    "trained on this region's data with --run so its constituents are retrained."
                )
            if do_retrain:
                for r in runs:
                    _retrain_and_print(r, state)
            elif runs:
                out.print("Serve the erasure with: " + "; ".join(f"fedcrm retrain {r} --state {state}" for r in runs))
        except FedcrmError as e:
            exit_with(e)

    @app.command("retrain")
    def retrain_cmd(
        run_dir: Annotated[Path, typer.Argument(help="The run folder whose stale constituents to retrain.")],
        state: StateOpt = DEFAULT_STATE,
        federation: Annotated[
            str | None,
            typer.Option(
                "--federation",
                help="Retrain on the federation `fedcrm deploy up --name NAME` left "
                "running (its name or folder) instead of in simulation; --state defaults to its regions'.",
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")] = False,
    ) -> None:
        """Serve pending erasures on a run: retrain only the stale constituents, federatedly, with fresh randomness.

        The old constituent weights and the stale shard's checkpoints are overwritten and deleted, the
        run gets a new model version, and every request gets a receipt (RUN_DIR/receipts/,
        RUN_DIR/erasures.jsonl). The retrain is charged to each region's privacy ledger; a region whose
        budget does not allow it refuses, and then nothing changes. After a crash, run it again.
        """
        try:
            if federation is not None and state == DEFAULT_STATE:
                from fedcrm.deploy.federation import Federation, deployment_folder

                state = Federation.load(deployment_folder(federation)).state_root
            _retrain_and_print(run_dir, state, as_json=as_json, federation=federation)
        except FedcrmError as e:
            exit_with(e)
