"""Trust commands, run at a data owner's side: ``fedcrm explain`` and ``fedcrm audit privacy``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedcrm.commands import audit
from fedcrm.commands.common import EXIT_PRIVACY_REFUSAL, console, exit_with, out
from fedcrm.errors import ConfigError, DataError, FedcrmError, PolicyError


def explain(
    region: Annotated[str, typer.Option(help="Your region (its forgotten customers are never explained).")],
    customer_id: Annotated[str, typer.Option("--customer-id", help="The customer to explain.")],
    model: Annotated[Path, typer.Option("--model", help="Run folder holding the served model (RUN_DIR).")],
    data: Annotated[
        Path | None, typer.Option(help="Your customer table (default: the region's file recorded in the run).")
    ] = None,
    schema: Annotated[Path | None, typer.Option(help="Declared schema (default: the run's schema).")] = None,
    state: Annotated[Path, typer.Option("--state", help="Folder of every region's state.")] = Path("state"),
    top: Annotated[int, typer.Option(help="How many contributions to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Explain one customer's score: the columns that moved it most, in probability points.

    Contributions are measured against a reference customer made from the schema alone (each number
    at the middle of its declared range, each yes/no half-way, each category spread evenly), and add
    up to the score minus the reference's score. Exact for the logistic model; integrated gradients
    for the MLP. Runs where the data is: nothing leaves the machine.
    """
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.io import load_table
    from fedcrm.data.schema import load_schema
    from fedcrm.evaluation.explain import explain_customer
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.unlearning.tombstones import Tombstones

    try:
        served = ServedModel.load(model)
        data_path = data or served.region_data(region)
        if data_path is None:
            raise ConfigError(f"the run does not record a data file for region {region}: pass --data")
        schema_path = schema or served.schema_path()
        if schema_path is None:
            raise ConfigError("the run does not record its schema: pass --schema")
        sch = load_schema(schema_path)
        served.check_schema(sch)
        task = str(served.config.get("task", ""))
        state_dir = state / region
        if state_dir.exists() and Tombstones(state_dir).contains(customer_id):
            raise PolicyError(f"customer {customer_id} was forgotten in region {region}: no score, no explanation")
        table = load_table(data_path, sch)
        row = table.ids == customer_id
        if not row.any():
            raise DataError(f"customer {customer_id} is not in this table", path=str(data_path))
        one = table.subset(row)
        consent = sch.consent_for(task) if task in sch.purposes else None
        if consent is not None and not bool(one.consent[task].iloc[0]):
            raise PolicyError(f"customer {customer_id} has not consented to purpose `{task}`: no score is computed")
        x = FeatureEncoder(sch).encode(one)[0]
        values = {c: one.values[c].iloc[0] for c in one.values.columns}
        e = explain_customer(served.models, schema=sch, x=x, values=values, customer_id=customer_id)
    except FedcrmError as err:
        exit_with(err)
    if as_json:
        out.print_json(json.dumps(e.as_dict(task=task, top=top)))
        return
    what = {"churn": "churn risk", "propensity": "propensity to buy"}.get(task, "score")
    out.print(
        f"[bold]{customer_id}[/] ({region}): {what} {e.score * 100:.1f}%  "
        f"(reference customer {e.reference_score * 100:.1f}%, {e.method})"
    )
    for c in e.top(top):
        colour = "red" if c.points >= 0 else "green"
        out.print(f"  [{colour}]{c.sentence(task)}[/]")
    rest = sum(c.points for c in e.top(len(e.contributions))[top:])
    if len(e.contributions) > top:
        out.print(f"  the other {len(e.contributions) - top} columns together: {rest:+.1f} points")
    if e.completeness_error > 0.005:
        out.print(f"[yellow]warning:[/] contributions miss the score change by {e.completeness_error * 100:.2f} points")


def audit_privacy(
    run_dir: Annotated[Path, typer.Argument(help="The run folder (RUN_DIR) whose served model is audited.")],
    state: Annotated[Path, typer.Option("--state", help="Folder of every region's state.")] = Path("state"),
    region: Annotated[
        list[str] | None, typer.Option(help="Audit only this region (repeatable; default: every region of the run).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="The region's table, when auditing one region.")] = None,
    white_box: Annotated[
        bool, typer.Option("--white-box", help="Play the server: rerun the region's DP-SGD with gradient canaries.")
    ] = False,
    canaries: Annotated[int, typer.Option(help="White-box: how many gradient canaries.", min=2)] = 1000,
    claimed_epsilon: Annotated[
        float | None, typer.Option(help="Check against this ε instead of each region's ledger (or plan).")
    ] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the ε lower bound.")] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One-run privacy audit per region (Steinke, Nasr & Jagielski 2023): an ε the training provably exceeds.

    Black-box (default): the region's customers are the canaries (half of them training customers, half
    hold-out, by the auditor's coin), scored by the served model's loss; the claim is the region's
    ledger. --white-box: the auditor plays the server, reruns the region's real DP-SGD (its table, σ, q,
    steps and δ, secret randomness, SGD) with gradient canaries and scores them from every round's
    update; the claim is the ε of those releases. Writes RUN_DIR/privacy_audit.json. Exits 3 when a lower
    bound exceeds the claimed ε: the DP path is broken.
    """
    from fedcrm.evaluation.privacy_audit import audit_region, verdict
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.evaluation.white_box_audit import audit_region_white_box
    from fedcrm.runs import RunDir

    try:
        cfg = RunDir.open(run_dir, finished=True).config
        served = ServedModel.load(run_dir)
        regions = region or list(cfg.regions)
        if data is not None and len(regions) != 1:
            raise ConfigError("--data names one region's table: give exactly one --region with it")
        results: dict[str, Any] = {}
        for r in regions:
            if r not in cfg.regions:
                raise ConfigError(f"region {r} is not in the run (regions: {list(cfg.regions)})")
            where: dict[str, Any] = {
                "region": r,
                "cfg": cfg,
                "data_path": data or cfg.regions[r],
                "state_dir": state / r,
                "policy_path": cfg.policies.get(r),
                "confidence": confidence,
            }
            results[r] = (
                audit_region_white_box(**where, canaries=canaries)
                if white_box
                else audit_region(**where, served=served)
            )
            if claimed_epsilon is not None:
                results[r]["claimed_epsilon"] = claimed_epsilon
                results[r]["verdict"] = verdict(results[r]["epsilon_lower_bound"], claimed_epsilon=claimed_epsilon)
    except FedcrmError as err:
        exit_with(err)
    report = {"run": str(run_dir), "model_version": served.version, "regions": results}
    (run_dir / "privacy_audit.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if as_json:
        out.print_json(json.dumps(report))
    else:
        t = Table(
            "region",
            "audit",
            "canaries",
            "guesses in/out",
            "correct",
            "AUC",
            f"ε lower bound ({confidence:.0%})",
            "ε claimed",
            "verdict",
        )
        for r, res in results.items():
            claimed = res["claimed_epsilon"]
            t.add_row(
                r,
                res["mode"],
                str(res["canaries"]),
                f"{res['guesses_in']}/{res['guesses_out']}",
                str(res["correct"]),
                f"{res['auc']:.3f}",
                f"{res['epsilon_lower_bound']:.3f}",
                "∞ (no DP)" if claimed is None else f"{claimed:.3f}",
                res["verdict"],
            )
        out.print(t)
    bad = {r: res for r, res in results.items() if res["verdict"] == "violation"}
    for r, res in bad.items():
        console.print(
            f"[bold red]PRIVACY AUDIT FAILED[/] region {r}: the {res['mode']} audit proves ε ≥ "
            f"{res['epsilon_lower_bound']:.3f} with {confidence:.0%} confidence, above the claimed ε = "
            f"{res['claimed_epsilon']:.3f}. The DP training path does not deliver its guarantee (noise, "
            "clipping, sampling or accounting is broken): do not release this model, and report it."
        )
    if bad:
        raise typer.Exit(EXIT_PRIVACY_REFUSAL)
    if not as_json and any(math.isfinite(res["auc"]) and res["auc"] > 0.6 for res in results.values()):
        console.print(
            "[yellow]note:[/] an AUC above 0.6 means the canaries' scores measurably reveal which "
            "of them were trained on."
        )


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
    audit.audit_app.command("privacy")(audit_privacy)
    audit.register(app)
