"""Plots as matplotlib Figures (Agg backend, nothing shown), so that tests can inspect them: axes labelled,
one line per series."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from fedcrm.report.tables import EPSILON_KEY, baselines, done_cells, epsilon_value, other_grid_keys  # noqa: E402


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
        ax.plot(
            [r["round"] for r in rs],
            [r.get("pooled", {}).get("auc", math.nan) for r in rs],
            marker="o",
            linewidth=2,
            label=label,
        )
    if len(shards) == 1:
        regions = sorted({reg for r in rows for reg in r.get("regions", {})})
        for reg in regions:
            ax.plot(
                [r["round"] for r in rows],
                [r.get("regions", {}).get(reg, {}).get("auc", math.nan) for r in rows],
                linestyle="--",
                alpha=0.8,
                label=f"region {reg}",
            )
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
        ax.annotate(
            f"budget ε = {b:g}",
            xy=(x[-1] if x else 1, b),
            xytext=(0, 3),
            textcoords="offset points",
            color="red",
            fontsize=8,
            ha="right",
        )
    targets = sorted({p["target_epsilon"] for p in privacy.values() if p.get("target_epsilon") is not None})
    for t in targets:
        ax.axhline(t, color="gray", linestyle=":", linewidth=1, label=f"_target {t:g}")
        ax.annotate(
            f"target ε = {t:g}",
            xy=(x[-1] if x else 1, t),
            xytext=(0, 3),
            textcoords="offset points",
            color="gray",
            fontsize=8,
            ha="right",
        )
    shards = len({int(r.get("shard", 0)) for r in rows})
    ax.set_xlabel("round" if shards <= 1 else "round (constituents trained one after another)")
    ax.set_ylabel("ε spent (δ as in the run)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_privacy_utility(df: pd.DataFrame, *, grid: list[str]) -> Figure | None:
    """Mean ± std of pooled AUC across seeds per target ε; one errorbar line per value of the other grid keys."""
    d = done_cells(df[df["kind"] == "federated"]) if "kind" in df else done_cells(df)
    if EPSILON_KEY not in d:
        return None
    d = d.assign(_eps=d[EPSILON_KEY].map(epsilon_value)).dropna(subset=["_eps"])
    if d.empty:
        return None
    fig, ax = _new_figure("Privacy–utility: pooled AUC vs target ε (mean ± std over seeds)")
    others = other_grid_keys(d, grid)
    groups = d.groupby([d[k].astype(str) for k in others]) if others else [((), d)]
    for key, g in groups:
        stats = g.groupby("_eps")["auc"].agg(["mean", "std", "count"]).sort_index()
        label = (
            "federated, sample-level DP"
            if not others
            else ", ".join(
                f"{k.split('.')[-1]}={v}"
                for k, v in zip(others, key if isinstance(key, tuple) else (key,), strict=True)
            )
        )
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
    d = done_cells(df[df["kind"] == "federated"])
    stats = d.groupby(d[key].astype(str), sort=False)["auc"].agg(["mean", "std", "count"])
    fig, ax = _new_figure(f"Pooled AUC by {key} (mean ± std over seeds)")
    xs = np.arange(len(stats))
    ax.errorbar(
        xs, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", linestyle="-", capsize=4, label="federated"
    )
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
