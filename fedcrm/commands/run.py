"""``fedcrm run``: train a model across regions in simulation and print its summary."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcrm.commands.common import DEFAULT_STATE, RayAddressOpt, StateOpt, console, exit_with, out, progress
from fedcrm.errors import ConfigError, FedcrmError, FederationRefused
from fedcrm.overrides import parse_overrides  # `fedcrm run --set`, and the deployment run config
from fedcrm.run_summary import RunSummary


def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/churn_telco_dp.yaml.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: OUTPUT_DIR/NAME from the config).")
    ] = None,
    state: StateOpt = DEFAULT_STATE,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run in --out (or the config's run folder) from its last "
            "completed round's checkpoint; a round retried after the crash is a new release (fresh noise), "
            "charged again.",
        ),
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Client processes the simulation runs (each ~0.45 GB). Default: one per "
            "8 regions, at most one per core; more only pays off when regions have large tables.",
        ),
    ] = None,
    ray_address: RayAddressOpt = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE replacing a config key (repeatable), typed as YAML and validated "
            "like the file, e.g. --set training.rounds=20 --set privacy.target_epsilon=1.",
        ),
    ] = None,
    federation: Annotated[
        str | None,
        typer.Option(
            "--federation",
            help="Submit to the federation `fedcrm deploy up --name NAME` left running (its name or folder) with "
            "`flwr run`, instead of simulating: the regions' data and state are the deployment's.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's summary as one JSON document.")] = False,
) -> None:
    """Train a model across regions in simulation (one virtual Flower SuperNode per region).

    Each region trains on its own table with DP-SGD and charges every release to its privacy ledger
    under --state; the run folder gets the metrics per round, checkpoints, the model and summary.json.
    """
    from fedcrm.config import load_config
    from fedcrm.experiment import materialise_regions

    if federation is not None:
        _run_on_federation(
            config,
            federation=federation,
            out_dir=out_dir,
            state=state,
            overrides=overrides,
            unsupported={"--resume": resume, "--processes": processes, "--ray-address": ray_address},
            as_json=as_json,
        )
        return
    try:
        cfg = load_config(config)
        if overrides:
            cfg = cfg.with_overrides(parse_overrides(overrides), source=f"{config} --set")
        run_dir = out_dir or cfg.output_dir / cfg.name
        regions = cfg.split.regions if cfg.split is not None else cfg.regions  # named before a split is made
        console.print(
            f"[bold]fedcrm run[/] {cfg.name}: {len(regions)} regions, {cfg.training.rounds} rounds, "
            f"privacy {cfg.privacy.mode}"
            + (f" ε={cfg.privacy.target_epsilon:g}" if cfg.privacy.mode == "sample_dp" else "")
        )
        cfg = materialise_regions(cfg, data_dir=run_dir / "regions")
        if resume and not (run_dir / "config.yaml").exists():
            raise FedcrmError(f"--resume: {run_dir} holds no run to resume (no config.yaml)")
        # After the first line: Flower, Ray and torch take seconds to import, and the line says what runs.
        from fedcrm.fl.simulation import run_simulated

        summary = run_simulated(
            cfg,
            run_dir=run_dir,
            state_root=state,
            report=progress,
            resume=resume,
            processes=processes,
            ray_address=ray_address,
        )
        if cfg.tracking.kind != "none":
            from fedcrm.report import write_run_report
            from fedcrm.tracking import log_run

            write_run_report(run_dir)
            console.print(f"tracked in MLflow run {log_run(cfg, run_dir, summary)}")
    except FederationRefused as e:  # every region refused: say where each one's reasons are
        refusals = dropped_out(e.refused, regions=e.refused, state=state)
        for who, what in refusals.items():
            progress(_dropped_line(who, what))
        exit_with(e, as_json=as_json, dropped_out=refusals)
    except FedcrmError as e:
        exit_with(e, as_json=as_json)
    if as_json:
        document = {
            "run_dir": str(run_dir),
            **summary.to_dict(),
            "dropped_out": dropped_out(summary.problems(), regions=summary.privacy, state=state),
        }
        out.print_json(json.dumps(document, default=str))
        return
    _print_summary(summary, run_dir, state=state)


def _run_on_federation(
    config: Path,
    *,
    federation: str,
    out_dir: Path | None,
    state: Path,
    overrides: list[str] | None,
    unsupported: dict[str, object],
    as_json: bool,
) -> None:
    """``fedcrm run --federation``: one run on a deployment that stays up (fedcrm.deploy.federation)."""
    from fedcrm.commands.deploy import print_result
    from fedcrm.deploy.federation import Federation, deployment_folder, run_on

    try:
        given = [opt for opt, value in unsupported.items() if value]
        if given:
            raise ConfigError(f"--federation runs on the deployment's SuperNodes: {', '.join(given)} do not apply")
        folder = deployment_folder(federation)
        fed = Federation.load(folder)
        if state != DEFAULT_STATE and state.resolve() != fed.state_root:
            raise ConfigError(
                f"--state {state}: the regions of federation {fed.name} keep their state in "
                f"{fed.state_root} (set at `deploy up`)"
            )
        result = run_on(folder, config, run_dir=out_dir, overrides=overrides, report=progress)
    except FedcrmError as e:
        exit_with(e, as_json=as_json)
    print_result(result)


def dropped_out(problems: dict[str, str], *, regions: Iterable[str], state: Path) -> dict[str, dict[str, str]]:
    """Every region (or node) in ``problems`` (who -> why: its fixed refusal code, or the failure in general
    terms, as the server was told) and where the details are. The words stay at the region (they may quote
    a cell of its table): in simulation a region's audit log is STATE/REGION/audit.log."""
    found: dict[str, dict[str, str]] = {}
    for who, why in problems.items():
        found[who] = {"reason": why}
        audit = state / who / "audit.log"
        if who in regions and audit.is_file():
            found[who]["details"] = str(audit)
    return found


def _dropped_line(who: str, what: dict[str, str]) -> str:
    where = f"; details in its audit log {what['details']}" if "details" in what else ""
    return f"region {who} did not take part in full: {what['reason']}{where}"


def _print_summary(summary: RunSummary, run_dir: Path, *, state: Path) -> None:
    from fedcrm.evaluation.metrics import with_noise

    m = summary.final_metrics
    out.print(
        f"\n[bold]Served model[/] (pooled hold-out of about {int(m.get('customers', 0))} customers, DP answers): "
        f"AUC {with_noise(m.get('auc', float('nan')), m.get('auc_noise_sd'))}"
        + (" (± one sd of the DP noise)" if "auc_noise_sd" in m else "")
        + f", log-loss {m.get('log_loss', float('nan')):.4f}, "
        f"accuracy {m.get('accuracy', float('nan')):.4f}, Brier {m.get('brier', float('nan')):.4f}"
    )
    t = Table("region", "ε spent (all history)", "δ", "budget", "refused")
    for r, p in summary.privacy.items():
        eps = p.get("epsilon")
        t.add_row(
            r,
            "-" if eps is None else f"{eps:.3f}",
            "-" if p.get("delta") is None else f"{p['delta']:.1e}",  # a region that never answered has none
            "-" if p.get("budget") is None else f"{p['budget']:g}",
            p.get("refused") or "",
        )
    out.print(t)
    against = {p["against_server"] for p in summary.privacy.values() if p.get("against_server")}
    for text in sorted(against):  # client-level DP: the ε above holds against the model's users only
        out.print(f"ε against the server: {text}")
    for who, what in dropped_out(summary.problems(), regions=summary.privacy, state=state).items():
        out.print(_dropped_line(who, what), markup=False, highlight=False)
    for w in summary.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    out.print(f"Results in [bold]{run_dir}[/]: summary.json, metrics.jsonl, model/, checkpoints/")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
