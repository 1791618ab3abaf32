"""Reports that an ML engineer can read and share: a self-contained HTML page and a Markdown twin.

``write_report(RUN_DIR)`` covers one run: utility per round, ε spent per round per region against the
budget, config and provenance; it also writes the run's ``model_card.md``. ``write_report(SWEEP_DIR)``
covers a sweep: the privacy–utility curve with error bars across seeds, the cost of privacy in AUC
points next to the non-private federated and centralised baselines, and a model card per cell.

Plot functions return matplotlib Figures (Agg backend, nothing shown) so tests can inspect them: axes
labelled, one line per series. The HTML embeds every plot as a base64 PNG; the Markdown links PNG files
written next to it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from fedcrm.errors import StorageError  # noqa: E402
from fedcrm.run_summary import RunSummary  # noqa: E402
from fedcrm.runs import CONFIG_FILE, read_metrics  # noqa: E402

EPSILON_KEY = "privacy.target_epsilon"

PRIVACY_MODES_TEXT = (
    "**What each privacy mode protects.** "
    "*none*: no differential privacy; the model updates a region sends, and the final model, can reveal "
    "whether a given customer was in the training data. "
    "*sample_dp* (DP-SGD at every region, sample-level): each region clips every customer's gradient and adds "
    "Gaussian noise; ε bounds how much the whole run's outputs can change when one customer's record is added "
    "or removed, so it protects each customer against anyone who sees the updates or the model, the server "
    "included. It does not hide a region's overall statistics. "
    "*client_dp* (DP-FedAvg, client-level): the server clips each region's whole update and adds noise to the "
    "aggregate; ε bounds what the model reveals about a whole region's participation, a stronger unit, but the "
    "server sees each region's clipped update before the noise, and with a handful of regions the noise needed "
    "either drowns the model or leaves a large ε."
)


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class RunView:
    path: Path
    config: dict[str, Any]
    summary: RunSummary
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: Path) -> RunView:
        summary = RunSummary.read(run_dir)
        # The config as written, not validated: a report shows what the run was given, old settings included.
        cfg_path = run_dir / CONFIG_FILE
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        return cls(path=run_dir, config=config or {}, summary=summary, rows=read_metrics(run_dir / "metrics.jsonl"))

    @property
    def is_centralised(self) -> bool:
        return self.summary.is_centralised


def sha256_of(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(view: RunView) -> dict[str, Any]:
    """Code version, data and schema file hashes, seeds: what it takes to repeat the run."""
    cfg = view.config
    files: dict[str, str | None] = {}
    for region, p in (cfg.get("regions") or {}).items():
        files[f"region {region}: {p}"] = sha256_of(Path(p))
    split = cfg.get("split") or {}
    if split.get("input"):
        files[f"split input: {split['input']}"] = sha256_of(Path(split["input"]))
    if cfg.get("schema"):
        files[f"schema: {cfg['schema']}"] = sha256_of(Path(cfg["schema"]))
    return {
        "code_version": view.summary.code_version,
        "config_sha256": view.summary.config_sha256,
        "run_id": view.summary.run_id,
        "seed": cfg.get("seed"),
        "split_seed": split.get("seed"),
        "files_sha256": files,
    }


# -- plots ---------------------------------------------------------------------------------------------


def _new_figure(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def series_lines(ax: Any) -> list[Any]:
    """The lines of an axes that stand for a series, each labelled: error-bar curves (matplotlib keeps
    their label on the container) first, then plain lines with a legend label."""
    out = []
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer) and c.lines[0] is not None:
            c.lines[0].set_label(c.get_label())
            out.append(c.lines[0])
    return out + [ln for ln in ax.get_lines() if not str(ln.get_label()).startswith("_") and ln not in out]


def plot_utility_per_round(rows: list[dict[str, Any]]) -> Figure:
    """Pooled hold-out AUC after every round; one line per constituent, plus one per region (1 shard)."""
    fig, ax = _new_figure("Utility per round (hold-out AUC)")
    shards = sorted({int(r.get("shard", 0)) for r in rows})
    for k in shards:
        rs = [r for r in rows if int(r.get("shard", 0)) == k]
        label = "pooled" if len(shards) == 1 else f"pooled, constituent {k}"
        ax.plot([r["round"] for r in rs], [r.get("pooled", {}).get("auc", math.nan) for r in rs],
                marker="o", linewidth=2, label=label)
    if len(shards) == 1:
        regions = sorted({reg for r in rows for reg in r.get("regions", {})})
        for reg in regions:
            ax.plot([r["round"] for r in rows],
                    [r.get("regions", {}).get(reg, {}).get("auc", math.nan) for r in rows],
                    linestyle="--", alpha=0.8, label=f"region {reg}")
    ax.set_xlabel("round")
    ax.set_ylabel("AUC on the hold-out")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_epsilon_per_round(rows: list[dict[str, Any]], privacy: dict[str, dict[str, Any]]) -> Figure:
    """ε spent (whole ledger history) after each round, one line per region, against budget and target."""
    fig, ax = _new_figure("Privacy spent per region (ε, whole history)")
    x = list(range(1, len(rows) + 1))
    regions = sorted({reg for r in rows for reg in r.get("epsilon", {})} | set(privacy))
    for reg in regions:
        ax.plot(x, [r.get("epsilon", {}).get(reg, math.nan) for r in rows], marker="o", label=f"region {reg}")
    budgets = sorted({p["budget"] for p in privacy.values() if p.get("budget") is not None})
    for b in budgets:
        ax.axhline(b, color="red", linestyle="-", linewidth=1, label=f"_budget {b:g}")
        ax.annotate(f"budget ε = {b:g}", xy=(x[-1] if x else 1, b), xytext=(0, 3), textcoords="offset points",
                    color="red", fontsize=8, ha="right")
    targets = sorted({p["target_epsilon"] for p in privacy.values() if p.get("target_epsilon") is not None})
    for t in targets:
        ax.axhline(t, color="gray", linestyle=":", linewidth=1, label=f"_target {t:g}")
        ax.annotate(f"target ε = {t:g}", xy=(x[-1] if x else 1, t), xytext=(0, 3), textcoords="offset points",
                    color="gray", fontsize=8, ha="right")
    shards = len({int(r.get("shard", 0)) for r in rows})
    ax.set_xlabel("round" if shards <= 1 else "round (constituents trained one after another)")
    ax.set_ylabel("ε spent (δ as in the run)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _epsilon_value(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _done(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "done") & df["auc"].notna()]


def baselines(df: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    """(mean, std, n) of pooled AUC: non-private federated (ε = none) and centralised."""
    d = _done(df)
    out: dict[str, tuple[float, float, int]] = {}
    if EPSILON_KEY in d:
        fed = d[(d["kind"] == "federated") & (d[EPSILON_KEY].astype(str) == "none")]["auc"]
        if len(fed):
            out["non-private federated"] = (float(fed.mean()), float(fed.std(ddof=1)) if len(fed) > 1 else 0.0,
                                            len(fed))
    cen = d[d["kind"] == "centralised"]["auc"]
    if len(cen):
        out["non-private centralised (pooled data)"] = (float(cen.mean()),
                                                   float(cen.std(ddof=1)) if len(cen) > 1 else 0.0, len(cen))
    return out


def other_grid_keys(df: pd.DataFrame, grid: list[str]) -> list[str]:
    return [k for k in grid if k != EPSILON_KEY and k in df]


def plot_privacy_utility(df: pd.DataFrame, *, grid: list[str]) -> Figure | None:
    """Mean ± std of pooled AUC across seeds per target ε; one errorbar line per value of the other grid keys."""
    d = _done(df[df["kind"] == "federated"]) if "kind" in df else _done(df)
    if EPSILON_KEY not in d:
        return None
    d = d.assign(_eps=d[EPSILON_KEY].map(_epsilon_value)).dropna(subset=["_eps"])
    if d.empty:
        return None
    fig, ax = _new_figure("Privacy–utility: pooled AUC vs target ε (mean ± std over seeds)")
    others = other_grid_keys(d, grid)
    groups = d.groupby([d[k].astype(str) for k in others]) if others else [((), d)]
    for key, g in groups:
        stats = g.groupby("_eps")["auc"].agg(["mean", "std", "count"]).sort_index()
        label = "federated, sample-level DP" if not others else ", ".join(
            f"{k.split('.')[-1]}={v}" for k, v in zip(others, key if isinstance(key, tuple) else (key,), strict=True))
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=4, label=label)
    styles = {"non-private federated": ("green", "--"), "non-private centralised (pooled data)": ("black", ":")}
    for name, (mean, _, _) in baselines(df).items():
        color, ls = styles.get(name, ("gray", "-."))
        ax.axhline(mean, color=color, linestyle=ls, label=name)
    ax.set_xscale("log")
    eps_values = sorted(d["_eps"].unique())
    ax.set_xticks(eps_values, [f"{v:g}" for v in eps_values])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("target ε per region (log scale)")
    ax.set_ylabel("pooled hold-out AUC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_by_parameter(df: pd.DataFrame, key: str) -> Figure:
    """Mean ± std of pooled AUC per value of a categorical grid key (e.g. the privacy mode)."""
    d = _done(df[df["kind"] == "federated"])
    stats = d.groupby(d[key].astype(str), sort=False)["auc"].agg(["mean", "std", "count"])
    fig, ax = _new_figure(f"Pooled AUC by {key} (mean ± std over seeds)")
    xs = np.arange(len(stats))
    ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", linestyle="-", capsize=4,
                label="federated")
    for name, (mean, _, _) in baselines(df).items():
        if name.startswith("centralised"):
            ax.axhline(mean, color="black", linestyle=":", label=name)
    ax.set_xticks(xs, list(stats.index), rotation=15, fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel("pooled hold-out AUC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)  # a no-op for a bare Figure; frees it if pyplot ever made it
    return buf.getvalue()


# -- tables --------------------------------------------------------------------------------------------


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def privacy_utility_table(df: pd.DataFrame, *, grid: list[str]) -> pd.DataFrame:
    """One row per ε (and baselines): mean ± std pooled AUC, seeds, ε spent, and in AUC points (×100) the cost
    of privacy (non-private federated minus this) and the gap to the centralised baseline."""
    d = _done(df[df["kind"] == "federated"])
    base = baselines(df)
    ref = base.get("non-private federated")
    cen = base.get("non-private centralised (pooled data)")
    rows: list[dict[str, Any]] = []
    if EPSILON_KEY in d:
        others = other_grid_keys(d, grid)
        d = d.assign(_eps=d[EPSILON_KEY].map(_epsilon_value)).dropna(subset=["_eps"])
        keys = [*(d[k].astype(str) for k in others), d["_eps"]]
        for key, g in d.groupby(keys):
            key_t = key if isinstance(key, tuple) else (key,)
            mean, std = float(g["auc"].mean()), float(g["auc"].std(ddof=1)) if len(g) > 1 else 0.0
            row: dict[str, Any] = {k.split(".")[-1]: v for k, v in zip(others, key_t[:-1], strict=True)}
            row |= {"ε (target)": f"{key_t[-1]:g}", "pooled AUC (mean ± std)": _pm(mean, std), "seeds": len(g),
                    "ε spent (max region, mean)": f"{g['epsilon_max'].mean():.3f}",
                    "cost of privacy (AUC points)": f"{(ref[0] - mean) * 100:+.2f}" if ref else "n/a",
                    "gap to centralised (AUC points)": f"{(cen[0] - mean) * 100:+.2f}" if cen else "n/a"}
            rows.append(row)
    for name, (mean, std, n) in base.items():
        rows.append({"ε (target)": f"none ({name})", "pooled AUC (mean ± std)": _pm(mean, std), "seeds": n,
                     "ε spent (max region, mean)": "—",
                     "cost of privacy (AUC points)": f"{(ref[0] - mean) * 100:+.2f}" if ref else "n/a",
                     "gap to centralised (AUC points)": f"{(cen[0] - mean) * 100:+.2f}" if cen else "n/a"})
    return pd.DataFrame(rows)


def parameter_table(df: pd.DataFrame, key: str) -> pd.DataFrame:
    d = _done(df[df["kind"] == "federated"])
    stats = d.groupby(d[key].astype(str), sort=False).agg(
        auc_mean=("auc", "mean"), auc_std=("auc", "std"), seeds=("auc", "count"), eps=("epsilon_max", "mean"))
    return pd.DataFrame({key: stats.index,
                         "pooled AUC (mean ± std)": [_pm(m, 0.0 if math.isnan(s) else s)
                                                     for m, s in zip(stats["auc_mean"], stats["auc_std"],
                                                                     strict=True)],
                         "seeds": stats["seeds"].to_numpy(),
                         "ε spent (max region, mean)": [f"{e:.3f}" for e in stats["eps"]]})


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.to_numpy()) + " |")
    return "\n".join(lines)


# -- the documents -------------------------------------------------------------------------------------


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
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:0.25em 0.6em}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:0.85em}img{max-width:100%}</style>",
         f"</head><body><h1>{html.escape(title)}</h1>"]
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
    lines = [f"code version: {p['code_version']}", f"config sha256: {p['config_sha256']}",
             f"run id: {p['run_id']}", f"seed: {p['seed']}" + (f", split seed: {p['split_seed']}"
                                                               if p["split_seed"] is not None else "")]
    lines += [f"{name}: sha256 {h or '(file not found now)'}" for name, h in p["files_sha256"].items()]
    return "\n".join(lines)


def run_sections(view: RunView) -> list[Section]:
    s = view.summary
    m = s.final_metrics
    metrics_md = ", ".join(f"{k} {v:.4f}" if k != "customers" else f"{int(v)} customers"
                           for k, v in m.items() if isinstance(v, int | float))
    sections = [Section("Result", f"Served model on the pooled hold-out: {metrics_md}. Privacy mode: "
                                  f"{s.privacy_mode}. Wall time {s.wall_time_s:.1f} s.")]
    if view.rows and not view.is_centralised:
        sections.append(Section("Utility per round", figure=("utility", plot_utility_per_round(view.rows))))
        if s.privacy_mode != "none":
            sections.append(Section(
                "Privacy spent per round per region",
                "ε after each round, composed over the region's whole ledger history, against the region's budget.",
                figure=("epsilon", plot_epsilon_per_round(view.rows, s.privacy))))
    priv = pd.DataFrame([{"region": r, **{k: p.get(k) for k in ("epsilon", "delta", "budget", "target_epsilon",
                                                                "refused")}}
                         for r, p in s.privacy.items()])
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
    from fedcrm.sweep import read_results

    df = read_results(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8")) if (
        sweep_dir / "sweep.json").exists() else {}
    spec = meta.get("spec", {})
    grid = list(spec.get("grid", {}))
    sections = [Section("Sweep", f"{len(df)} cells ({int((df['status'] == 'done').sum())} done, "
                                 f"{int((df['status'] == 'failed').sum())} failed); grid over "
                                 f"{', '.join(grid) or '(nothing)'}; seeds {spec.get('seeds', [])}.")]
    fig = plot_privacy_utility(df, grid=grid)
    if fig is not None:
        sections.append(Section(
            "Privacy–utility", "Pooled hold-out AUC of the served model, mean ± standard deviation over seeds. "
            "The cost of privacy is the drop in AUC points (×100) from the non-private federated model.",
            figure=("privacy_utility", fig), table=privacy_utility_table(df, grid=grid)))
    for key in other_grid_keys(df, grid):
        sections.append(Section(f"By {key}", figure=(f"by_{key.replace('.', '_')}", plot_by_parameter(df, key)),
                                table=parameter_table(df, key)))
    sections.append(Section("Privacy modes", PRIVACY_MODES_TEXT))
    failed = df[df["status"] == "failed"]
    if len(failed):
        sections.append(Section("Failed cells", table=failed[["cell", "error"]]))
    runs = [RunView.load(Path(p)) for p in df.loc[df["status"] == "done", "run_dir"]
            if RunSummary.exists_in(Path(p))]
    for v in runs:
        (v.path / "model_card.md").write_text(model_card(v), encoding="utf-8")
    versions = sorted({v.summary.code_version for v in runs})
    prov = [f"code version(s): {', '.join(versions) or 'unknown'}", f"seeds: {spec.get('seeds', [])}"]
    if runs:
        prov += [f"{n}: sha256 {h}" for n, h in provenance(runs[0]).get("files_sha256", {}).items()]
    for inv in meta.get("invocations", []):
        prov.append(f"invocation: engine {inv.get('engine')}, {inv.get('federated_cells_run')} federated cells in "
                    f"{inv.get('federated_wall_time_s')} s ({inv.get('seconds_per_federated_cell')} s per cell, "
                    f"{inv.get('engines_started')} engine start(s))")
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


# -- the model card ------------------------------------------------------------------------------------


def _plain_epsilon(eps: float, delta: float) -> str:
    odds = math.exp(eps)
    return (f"ε = {eps:.2f}, δ = {delta:.0e}: for any one customer, anything computed from this model is at most "
            f"e^ε ≈ {odds:.1f}× more (or less) likely with their record in the training data than without it, "
            f"except with probability δ. An observer who thought it 50–50 that the customer was included can "
            f"be at most about {odds / (1 + odds):.0%} sure after seeing the model (δ aside).")


def model_card(view: RunView) -> str:
    s, cfg = view.summary, view.config
    task = s.task
    purpose = {"churn": "rank existing customers by their risk of leaving, to prioritise retention offers",
               "propensity": "rank customers by their propensity to take up an offer, to prioritise outreach"}.get(
        task, task)
    m = s.final_metrics
    by_region = s.final_metrics_by_region or {}
    lines = [f"# Model card: {s.name}", "",
             "## Intended use", "",
             f"Task: **{task}**. Use: {purpose}. The output is a score in [0, 1] for ranking; it is not calibrated "
             "for individual decisions with legal or similarly significant effects, and must not be used for "
             "them without human review.", ""]
    if view.is_centralised:
        lines += ["**This is a centralised baseline**: every region's data was pooled in one place and no "
                  "differential privacy was applied. It exists only to measure the cost of federation and "
                  "privacy and must not be deployed.", ""]
    model = cfg.get("model", {})
    training = cfg.get("training", {})
    lines += ["## Model", "",
              f"{model.get('kind', '?')}"
              + (f" (hidden layers {model.get('hidden')})" if model.get("kind") == "mlp" else "")
              + f", trained for "
              f"{training.get('rounds')} federated rounds × {training.get('local_epochs')} local epoch(s), "
              f"{(cfg.get('federation') or {}).get('strategy', 'fedavg')}, "
              f"{s.shards or 1} SISA shard(s) (served model = mean of the constituents' probabilities).", "",
              "## Data", "",
              "| region | customers in table | excluded (no consent) | forgotten | training | hold-out | "
              "hold-out label rate |",
              "|---|---|---|---|---|---|---|"]
    for r, d in s.regions.items():
        rate = by_region.get(r, {}).get("positive_rate")
        lines.append(f"| {r} | {int(d.get('customers_in_table', 0))} | {int(d.get('excluded_no_consent', 0))} | "
                     f"{int(d.get('forgotten', 0))} | {int(d.get('train', 0))} | {int(d.get('holdout', 0))} | "
                     + ("—" if rate is None else f"{rate:.3f}") + " |")
    lines += ["", "Customers without consent for this purpose and customers who asked to be forgotten "
              "(tombstoned) were excluded before training. Each region's data stayed in the region; only model "
              "weights and aggregate metrics left it. Label rates are of the hold-out, reported only where the "
              "hold-out has at least the policy's minimum of customers.", "",
              "## Privacy guarantee", ""]
    mode = s.privacy_mode
    priv = s.privacy
    if mode == "sample_dp" and priv:
        worst = max((p for p in priv.values() if p.get("epsilon") is not None),
                    key=lambda p: p["epsilon"], default=None)
        lines += ["Sample-level differential privacy (DP-SGD at every region, every customer's gradient clipped "
                  "and noised). The guarantee is per customer and covers the model and every update sent "
                  "during training, against anyone, the server included."]
        if worst is not None:
            lines += ["", _plain_epsilon(float(worst["epsilon"]), float(worst["delta"])) +
                      " This is the largest ε spent by any region; per region below."]
        lines += ["", "| region | ε spent | δ | budget |", "|---|---|---|---|"]
        lines += [f"| {r} | {p.get('epsilon') if p.get('epsilon') is None else round(p['epsilon'], 3)} | "
                  f"{p.get('delta'):.0e} | {p.get('budget')} |" for r, p in priv.items()]
        lines += ["", "This is sample-level, not client-level, privacy: it protects each customer's record, not "
                  "whether a whole region took part; it does not hide facts true of many customers at once (a "
                  "region's churn rate), and a customer with several records (e.g. in two regions) is protected "
                  "per record."]
    elif mode == "client_dp":
        lines += ["Client-level differential privacy (DP-FedAvg): the server clips each region's whole update and "
                  "adds noise, so ε bounds what the model reveals about a whole region's participation. The "
                  "server sees each region's clipped update before the noise is added, and with few regions "
                  "this mode protects little. Per region ε as recorded in the regions' ledgers:", ""]
        lines += [f"- {r}: ε {p.get('epsilon')}" for r, p in priv.items()]
    else:
        lines += ["**No differential privacy.** The model and the updates sent during training can reveal "
                  "whether a given customer was in the training data (membership inference)."]
    lines += ["", "## Metrics", "",
              "Pooled hold-out (each region's hold-out, chosen by a seeded hash of the customer id, scored at "
              "the region and combined from aggregate histograms):", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if k != "customers" else f"| {k} | {int(v)} |" for k, v in m.items()]
    if by_region:
        lines += ["", "| region | AUC | log-loss | customers |", "|---|---|---|---|"]
        lines += [f"| {r} | {d.get('auc', math.nan):.4f} | {d.get('log_loss', math.nan):.4f} | "
                  f"{int(d.get('customers', 0))} |" for r, d in by_region.items()]
    lines += ["", "## Known limits", "",
              "- AUC is computed from score histograms of 2,000 bins (ties within a bin count one half); it may "
              "differ slightly from the exact AUC.",
              "- The hold-out comes from the same regions and period as the training data: drift over time and "
              "new regions are not measured.",
              "- Per-group fairness is not part of this card; check it before any use that affects customers.",
              *[f"- {w}" for w in s.warnings],
              "", f"Code version {s.code_version}, config sha256 {s.config_sha256}.", ""]
    return "\n".join(lines)
