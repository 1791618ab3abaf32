"""The documents: a self-contained HTML page (plots embedded as base64 PNG) and a Markdown twin (PNG files
next to it), for a run folder or a sweep folder."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure

from fedcrm.errors import StorageError
from fedcrm.privacy.client_dp import AGAINST_SERVER
from fedcrm.report.card import model_card
from fedcrm.report.plots import (
    figure_png,
    plot_by_parameter,
    plot_epsilon_per_round,
    plot_privacy_utility,
    plot_utility_per_round,
)
from fedcrm.report.reading import RunView, provenance
from fedcrm.report.tables import markdown_table, other_grid_keys, parameter_table, privacy_utility_table
from fedcrm.run_summary import RunSummary
from fedcrm.sweep_results import read_results

PRIVACY_MODES_TEXT = (
    "**What each privacy mode protects.** "
    "*none*: no differential privacy; the model updates a region sends, and the final model, can reveal "
    "whether a given customer was in the training data. "
    "*sample_dp* (DP-SGD at every region, sample-level): each region clips every customer's gradient and adds "
    "Gaussian noise; ε bounds how much the whole run's outputs can change when one customer's record is added "
    "or removed, so it protects each customer against anyone who sees the updates or the model, the server "
    "included. It does not hide a region's overall statistics. "
    "*client_dp* (DP-FedAvg, client-level): each region clips its whole update and the server adds noise to the "
    "aggregate; the ledgers charge each customer at σ/2 (one customer moves their region's clipped update by up "
    "to 2C), an ε that holds against other regions and the model's users only: the server sees each region's "
    f"clipped update before the noise, so against the server it is {AGAINST_SERVER}. With a handful of regions "
    "the noise needed either drowns the model or leaves a large ε."
)


@dataclass
class Section:
    title: str
    markdown: str = ""
    figure: tuple[str, Figure] | None = None  # (file stem, figure)
    table: pd.DataFrame | None = None
    pre: str | None = None


def _md_to_html(text: str) -> str:
    out = html.escape(text)
    out = _replace_pairs(out, "**", "<strong>", "</strong>")
    out = _replace_pairs(out, "*", "<em>", "</em>")
    return "".join(f"<p>{p}</p>" for p in out.split("\n\n") if p.strip())


def _replace_pairs(text: str, mark: str, open_: str, close: str) -> str:
    parts = text.split(mark)
    if len(parts) % 2 == 0:
        return text
    return "".join(p if i % 2 == 0 else f"{open_}{p}{close}" for i, p in enumerate(parts))


def render(title: str, sections: list[Section], *, out_dir: Path, stem: str = "report") -> tuple[Path, Path]:
    """Write ``STEM.html`` (self-contained) and ``STEM.md`` (+ ``STEM_files/*.png``) into ``out_dir``."""
    files = out_dir / f"{stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:0.25em 0.6em}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:0.85em}img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    md = [f"# {title}", ""]
    for s in sections:
        h.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        if s.markdown:
            h.append(_md_to_html(s.markdown))
            md += [s.markdown, ""]
        if s.figure is not None:
            name, fig = s.figure
            png = figure_png(fig)
            (files / f"{name}.png").write_bytes(png)
            b64 = base64.b64encode(png).decode("ascii")
            h.append(f"<img class='plot' alt='{html.escape(s.title)}' src='data:image/png;base64,{b64}'>")
            md += [f"![{s.title}]({files.name}/{name}.png)", ""]
        if s.table is not None and not s.table.empty:
            h.append(s.table.to_html(index=False, escape=True, na_rep=""))
            md += [markdown_table(s.table), ""]
        if s.pre is not None:
            h.append(f"<pre>{html.escape(s.pre)}</pre>")
            md += ["```", s.pre.rstrip("\n"), "```", ""]
    h.append("</body></html>")
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    html_path.write_text("\n".join(h), encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path


def _provenance_text(view: RunView) -> str:
    p = provenance(view)
    lines = [
        f"code version: {p['code_version']}",
        f"config sha256: {p['config_sha256']}",
        f"run id: {p['run_id']}",
        f"seed: {p['seed']}" + (f", split seed: {p['split_seed']}" if p["split_seed"] is not None else ""),
    ]
    lines += [f"{name}: sha256 {h or '(file not found now)'}" for name, h in p["files_sha256"].items()]
    return "\n".join(lines)


def run_sections(view: RunView) -> list[Section]:
    s = view.summary
    m = s.final_metrics
    metrics_md = ", ".join(
        f"{k} {v:.4f}" if k != "customers" else f"{int(v)} customers"
        for k, v in m.items()
        if isinstance(v, int | float)
    )
    sections = [
        Section(
            "Result",
            f"Served model on the pooled hold-out: {metrics_md}. Privacy mode: "
            f"{s.privacy_mode}. Wall time {s.wall_time_s:.1f} s.",
        )
    ]
    if view.rows and not view.is_centralised:
        sections.append(Section("Utility per round", figure=("utility", plot_utility_per_round(view.rows))))
        if s.privacy_mode != "none":
            sections.append(
                Section(
                    "Privacy spent per round per region",
                    "ε after each round, composed over the region's whole ledger history, against the region's budget.",
                    figure=("epsilon", plot_epsilon_per_round(view.rows, s.privacy)),
                )
            )
    priv = pd.DataFrame(
        [
            {"region": r, **{k: p.get(k) for k in ("epsilon", "delta", "budget", "target_epsilon", "refused")}}
            # client-level DP: the ε above holds against the model's users, not against the server
            | ({"against the server": p["against_server"]} if p.get("against_server") else {})
            for r, p in s.privacy.items()
        ]
    )
    if not priv.empty:
        sections.append(Section("Privacy per region", table=priv))
    for w in s.warnings:
        sections.append(Section("Warning", w))
    sections.append(Section("Privacy modes", PRIVACY_MODES_TEXT))
    sections.append(Section("Provenance", pre=_provenance_text(view)))
    sections.append(Section("Config", pre=yaml.safe_dump(view.config, sort_keys=False)))
    return sections


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    view = RunView.load(run_dir)
    (run_dir / "model_card.md").write_text(model_card(view), encoding="utf-8")
    return render(f"fedcrm run {view.summary.name}", run_sections(view), out_dir=run_dir)


def write_sweep_report(sweep_dir: Path) -> tuple[Path, Path]:
    df = read_results(sweep_dir)
    meta = (
        json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
        if (sweep_dir / "sweep.json").exists()
        else {}
    )
    spec = meta.get("spec", {})
    grid = list(spec.get("grid", {}))
    sections = [
        Section(
            "Sweep",
            f"{len(df)} cells ({int((df['status'] == 'done').sum())} done, "
            f"{int((df['status'] == 'failed').sum())} failed); grid over "
            f"{', '.join(grid) or '(nothing)'}; seeds {spec.get('seeds', [])}.",
        )
    ]
    fig = plot_privacy_utility(df, grid=grid)
    if fig is not None:
        sections.append(
            Section(
                "Privacy–utility",
                "Pooled hold-out AUC of the served model, mean ± standard deviation over seeds. "
                "The cost of privacy is the drop in AUC points (×100) from the non-private federated model.",
                figure=("privacy_utility", fig),
                table=privacy_utility_table(df, grid=grid),
            )
        )
    for key in other_grid_keys(df, grid):
        sections.append(
            Section(
                f"By {key}",
                figure=(f"by_{key.replace('.', '_')}", plot_by_parameter(df, key)),
                table=parameter_table(df, key),
            )
        )
    sections.append(Section("Privacy modes", PRIVACY_MODES_TEXT))
    failed = df[df["status"] == "failed"]
    if len(failed):
        sections.append(Section("Failed cells", table=failed[["cell", "error"]]))
    runs = [RunView.load(Path(p)) for p in df.loc[df["status"] == "done", "run_dir"] if RunSummary.exists_in(Path(p))]
    for v in runs:
        (v.path / "model_card.md").write_text(model_card(v), encoding="utf-8")
    versions = sorted({v.summary.code_version for v in runs})
    prov = [f"code version(s): {', '.join(versions) or 'unknown'}", f"seeds: {spec.get('seeds', [])}"]
    if runs:
        prov += [f"{n}: sha256 {h}" for n, h in provenance(runs[0]).get("files_sha256", {}).items()]
    for inv in meta.get("invocations", []):
        prov.append(
            f"invocation: engine {inv.get('engine')}, {inv.get('federated_cells_run')} federated cells in "
            f"{inv.get('federated_wall_time_s')} s ({inv.get('seconds_per_federated_cell')} s per cell, "
            f"{inv.get('engines_started')} engine start(s))"
        )
    sections.append(Section("Provenance", pre="\n".join(prov)))
    cols = [c for c in df.columns if c not in ("run_dir", "config_sha256")]
    sections.append(Section("All cells", table=df[cols].round(4)))
    sections.append(Section("Sweep spec", pre=yaml.safe_dump(spec, sort_keys=False)))
    return render(f"fedcrm sweep {spec.get('name', sweep_dir.name)}", sections, out_dir=sweep_dir)


def write_report(path: Path) -> tuple[Path, Path]:
    """A run folder (summary.json) or a sweep folder (results table)."""
    if RunSummary.exists_in(path):
        return write_run_report(path)
    if (path / "results.parquet").exists() or (path / "results.csv").exists():
        return write_sweep_report(path)
    raise StorageError(f"{path}: neither a run folder (summary.json) nor a sweep folder (results.parquet)")
