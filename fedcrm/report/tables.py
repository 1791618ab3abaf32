"""The sweep results table as the report sees it (finished cells, baselines) and the tables it prints."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

EPSILON_KEY = "privacy.target_epsilon"


def epsilon_value(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def done_cells(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "done") & df["auc"].notna()]


def baselines(df: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    """(mean, std, n) of pooled AUC: non-private federated (ε = none) and centralised."""
    d = done_cells(df)
    out: dict[str, tuple[float, float, int]] = {}
    if EPSILON_KEY in d:
        fed = d[(d["kind"] == "federated") & (d[EPSILON_KEY].astype(str) == "none")]["auc"]
        if len(fed):
            out["non-private federated"] = (
                float(fed.mean()),
                float(fed.std(ddof=1)) if len(fed) > 1 else 0.0,
                len(fed),
            )
    cen = d[d["kind"] == "centralised"]["auc"]
    if len(cen):
        out["non-private centralised (pooled data)"] = (
            float(cen.mean()),
            float(cen.std(ddof=1)) if len(cen) > 1 else 0.0,
            len(cen),
        )
    return out


def other_grid_keys(df: pd.DataFrame, grid: list[str]) -> list[str]:
    return [k for k in grid if k != EPSILON_KEY and k in df]


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def privacy_utility_table(df: pd.DataFrame, *, grid: list[str]) -> pd.DataFrame:
    """One row per ε (and baselines): mean ± std pooled AUC, seeds, ε spent, and in AUC points (×100) the cost
    of privacy (non-private federated minus this) and the gap to the centralised baseline."""
    d = done_cells(df[df["kind"] == "federated"])
    base = baselines(df)
    ref = base.get("non-private federated")
    cen = base.get("non-private centralised (pooled data)")
    rows: list[dict[str, Any]] = []
    if EPSILON_KEY in d:
        others = other_grid_keys(d, grid)
        d = d.assign(_eps=d[EPSILON_KEY].map(epsilon_value)).dropna(subset=["_eps"])
        keys = [*(d[k].astype(str) for k in others), d["_eps"]]
        for key, g in d.groupby(keys):
            key_t = key if isinstance(key, tuple) else (key,)
            mean, std = float(g["auc"].mean()), float(g["auc"].std(ddof=1)) if len(g) > 1 else 0.0
            row: dict[str, Any] = {k.split(".")[-1]: v for k, v in zip(others, key_t[:-1], strict=True)}
            row |= {
                "ε (target)": f"{key_t[-1]:g}",
                "pooled AUC (mean ± std)": _pm(mean, std),
                "seeds": len(g),
                "ε spent (max region, mean)": f"{g['epsilon_max'].mean():.3f}",
                "cost of privacy (AUC points)": f"{(ref[0] - mean) * 100:+.2f}" if ref else "n/a",
                "gap to centralised (AUC points)": f"{(cen[0] - mean) * 100:+.2f}" if cen else "n/a",
            }
            rows.append(row)
    for name, (mean, std, n) in base.items():
        rows.append(
            {
                "ε (target)": f"none ({name})",
                "pooled AUC (mean ± std)": _pm(mean, std),
                "seeds": n,
                "ε spent (max region, mean)": "—",
                "cost of privacy (AUC points)": f"{(ref[0] - mean) * 100:+.2f}" if ref else "n/a",
                "gap to centralised (AUC points)": f"{(cen[0] - mean) * 100:+.2f}" if cen else "n/a",
            }
        )
    return pd.DataFrame(rows)


def parameter_table(df: pd.DataFrame, key: str) -> pd.DataFrame:
    d = done_cells(df[df["kind"] == "federated"])
    stats = d.groupby(d[key].astype(str), sort=False).agg(
        auc_mean=("auc", "mean"), auc_std=("auc", "std"), seeds=("auc", "count"), eps=("epsilon_max", "mean")
    )
    return pd.DataFrame(
        {
            key: stats.index,
            "pooled AUC (mean ± std)": [
                _pm(m, 0.0 if math.isnan(s) else s) for m, s in zip(stats["auc_mean"], stats["auc_std"], strict=True)
            ],
            "seeds": stats["seeds"].to_numpy(),
            "ε spent (max region, mean)": [f"{e:.3f}" for e in stats["eps"]],
        }
    )


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.to_numpy()) + " |")
    return "\n".join(lines)
