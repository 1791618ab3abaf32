"""The ``fedcrm`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedcrm.commands.common import EXIT_INTERRUPTED, console, exit_with
from fedcrm.errors import FedcrmError
from fedcrm.overrides import parse_overrides  # re-exported: `fedcrm run --set` and the deployment run config

out = Console(soft_wrap=True)
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # inherited by every group and command below
app = typer.Typer(
    context_settings=HELP_OPTIONS,
    help="fedcrm: train customer models (churn, propensity) across regions without moving customer data, "
    "with differential privacy, an exact privacy ledger and erasure by retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    context_settings=HELP_OPTIONS,
    help="Customer tables: validate against a schema, split into regions, generate synthetic data.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

DEFAULT_STATE = Path("state")
StateOpt = Annotated[
    Path,
    typer.Option(
        "--state",
        help="Folder holding every region's state (privacy ledger, "
        "tombstones, secrets). In simulation: one sub-folder per region.",
    ),
]


def _progress(line: str) -> None:
    """A progress line as written: region names or reasons are not rich markup."""
    console.print(line, markup=False, highlight=False)


def _fail(e: Exception) -> None:
    exit_with(e)


def _version(value: bool) -> None:
    if value:
        from fedcrm import __version__

        out.print(f"fedcrm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print fedcrm's version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 privacy refusal, 130 interrupted."""


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet table to check.")],
    schema: Annotated[Path, typer.Option(help="Declared schema (YAML), e.g. configs/schemas/telco_churn.yaml.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    delimiter: Annotated[str | None, typer.Option(help="The file's CSV delimiter, as the region's config fixes "
                                                  "it (default: the schema's, else detected).")] = None,
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
        _fail(e)
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
        _fail(e)
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
        _fail(e)
    out.print(
        f"{manifest.rows} customers in {len(manifest.regions)} regions, churn rate "
        f"{manifest.label_rate:.3f} -> {out_dir}"
    )


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/churn_telco_dp.yaml.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: OUTPUT_DIR/NAME from the config).")
    ] = None,
    state: StateOpt = DEFAULT_STATE,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted run in --out (or the config's run folder) from its last "
            "completed round's checkpoint; a round retried after the crash is a new release (fresh noise), "
            "charged again."
        ),
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes", min=1, help="Client processes the simulation runs (each ~0.45 GB). Default: one per "
            "8 regions, at most one per core; more only pays off when regions have large tables."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE replacing a config key (repeatable), typed as YAML and validated "
                     "like the file, e.g. --set training.rounds=20 --set privacy.target_epsilon=1."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's summary as one JSON document.")] = False,
) -> None:
    """Train a model across regions in simulation (one virtual Flower SuperNode per region).

    Each region trains on its own table with DP-SGD and charges every release to its privacy ledger
    under --state; the run folder gets the metrics per round, checkpoints, the model and summary.json.
    """
    from fedcrm.config import load_config
    from fedcrm.experiment import materialise_regions
    from fedcrm.fl.simulation import run_simulated

    try:
        cfg = load_config(config)
        if overrides:
            cfg = cfg.with_overrides(parse_overrides(overrides), source=f"{config} --set")
        run_dir = out_dir or cfg.output_dir / cfg.name
        cfg = materialise_regions(cfg, data_dir=run_dir / "regions")
        console.print(
            f"[bold]fedcrm run[/] {cfg.name}: {len(cfg.regions)} regions, {cfg.training.rounds} rounds, "
            f"privacy {cfg.privacy.mode}"
            + (f" ε={cfg.privacy.target_epsilon:g}" if cfg.privacy.mode == "sample_dp" else "")
        )
        if resume and not (run_dir / "config.yaml").exists():
            raise FedcrmError(f"--resume: {run_dir} holds no run to resume (no config.yaml)")
        summary = run_simulated(
            cfg, run_dir=run_dir, state_root=state, report=_progress, resume=resume, processes=processes
        )
        if cfg.tracking.kind != "none":
            from fedcrm.report import write_run_report
            from fedcrm.tracking import log_run

            write_run_report(run_dir)
            console.print(f"tracked in MLflow run {log_run(cfg, run_dir, summary)}")
    except FedcrmError as e:
        _fail(e)
    if as_json:
        out.print_json(json.dumps({"run_dir": str(run_dir), **summary}, default=str))
        return
    _print_summary(summary, run_dir)


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    m = summary["final_metrics"]
    out.print(
        f"\n[bold]Served model[/] (pooled hold-out of about {int(m.get('customers', 0))} customers, DP answers): "
        f"AUC {m.get('auc', float('nan')):.4f}"
        + (f" ± {m['auc_noise_sd']:.3f} (DP noise)" if "auc_noise_sd" in m else "")
        + f", log-loss {m.get('log_loss', float('nan')):.4f}, "
        f"accuracy {m.get('accuracy', float('nan')):.4f}, Brier {m.get('brier', float('nan')):.4f}"
    )
    t = Table("region", "ε spent (all history)", "δ", "budget", "refused")
    for r, p in summary["privacy"].items():
        eps = p.get("epsilon")
        t.add_row(
            r,
            "-" if eps is None else f"{eps:.3f}",
            f"{p['delta']:.1e}",
            "-" if p.get("budget") is None else f"{p['budget']:g}",
            p.get("refused") or "",
        )
    out.print(t)
    for w in summary.get("warnings", []):
        out.print(f"[yellow]warning:[/] {w}")
    out.print(f"Results in [bold]{run_dir}[/]: summary.json, metrics.jsonl, model/, checkpoints/")


@app.command("budget")
def budget(
    region: Annotated[str, typer.Option(help="Region name.")],
    state: StateOpt = DEFAULT_STATE,
    accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
    policy: Annotated[
        Path | None, typer.Option(help="The region's policy file (its budget and δ); default: the default policy.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a region's privacy ledger: every release, ε spent over the whole history, budget, remaining.

    ε is per customer, at the δ the region's policy fixes: that of the worst-off customer, composing every
    release whose shard held them, under every shard count (S) the region's runs used.
    """
    from fedcrm.governance.policy import load_policy
    from fedcrm.privacy.ledger import PrivacyLedger
    from fedcrm.unlearning.budget import retrain_budgets

    try:
        state_dir = state / region
        if not (state_dir / "privacy_ledger.sqlite").exists():
            raise FedcrmError(f"no privacy ledger for region {region} under {state} (nothing released yet?)")
        ledger = PrivacyLedger.open(state_dir, region=region)
        rules = load_policy(policy)
        s = ledger.summary(delta=rules.delta, accountant=accountant, budget=rules.privacy_budget)
        s["retrains_left_by_shard"] = {str(k): b.retrains_left for k, b in retrain_budgets(
            ledger, budget=s["budget"], delta=rules.delta, accountant=accountant).items()}
    except FedcrmError as e:
        _fail(e)
    if as_json:
        out.print_json(json.dumps(s, default=str))
        return
    t = Table("id", "time", "run", "round", "shard", "σ", "q", "steps", "noise", "outcome")
    for ev in s["events"]:
        t.add_row(
            str(ev["id"]),
            ev["time"][:19],
            ev["run_id"],
            str(ev["round"]),
            f"{ev['shard']}/{ev['shards'] or '?'}",
            "none (no DP)" if ev["mechanism"] == "non_private" else f"{ev['noise_multiplier']:.3f}",
            f"{ev['sample_rate']:.4f}",
            str(ev["steps"]),
            ev["noise"],
            str(ev["status"]),
        )
    out.print(t)
    out.print(
        f"region [bold]{region}[/]: ε spent {s['epsilon_spent']:.3f} (worst-off customer, δ={rules.delta:g} from "
        f"the policy, {accountant}), budget {s['budget']:g}, remaining {s['remaining']:.3f}"
    )
    for size, per_shard in s["epsilon_by_shard"].items():
        if size != "1":
            out.print(f"shards of S={size}: " + ", ".join(f"{k}: {v:.3f}" for k, v in per_shard.items()))
    out.print("releases by noise: " + (", ".join(f"{k} {v}" for k, v in s["releases_by_noise"].items()) or "-"))
    if s["releases_by_noise"].get("seeded"):
        out.print("[yellow]warning:[/] releases marked `seeded` were made by fedcrm < 0.2 with noise derived from the "
                  "run's config: whoever wrote that config could predict their noise, so their ε does not hold "
                  "against the server.")
    if s["non_private_releases"]:
        out.print(f"[yellow]warning:[/] {s['non_private_releases']} release(s) without DP: ε is infinite for the "
                  "customers they read.")
    out.print("erasure retrains left (repeating each shard's last run): "
              + ", ".join(f"shard {k}: {v}" for k, v in s["retrains_left_by_shard"].items()))


# command modules: each registers its own commands on `app`.
from fedcrm.commands import governance as _governance_commands  # noqa: E402

_governance_commands.register(app)
from fedcrm.commands import trust as _trust_commands  # noqa: E402

_trust_commands.register(app)
from fedcrm.commands import report as _report_commands  # noqa: E402
from fedcrm.commands import sweep as _sweep_commands  # noqa: E402

_sweep_commands.register(app)
_report_commands.register(app)
from fedcrm.commands import unlearning as _unlearning_commands  # noqa: E402

_unlearning_commands.register(app)
from fedcrm.commands import deploy as _deploy_commands  # noqa: E402

_deploy_commands.register(app)
from fedcrm.commands import bundle as _bundle_commands  # noqa: E402

_bundle_commands.register(app)
from fedcrm.commands import score as _score_commands  # noqa: E402

_score_commands.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
