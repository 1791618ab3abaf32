"""Fairness per group of customers, computed from per-group score histograms that add up across regions.

For every sensitive attribute the schema declares, a region sends, per group, a histogram of its
hold-out scores for each class and the sum of scores, never a score keyed by customer. The groups and
their order come from the declared schema (vocabulary, yes/no, or the declared age bands), so the
server names them without the region sending any text. Summed over regions they give the pooled
per-group positive-prediction rate, TPR, FPR, AUC and calibration, and the gaps between groups:

- demographic parity difference: largest minus smallest positive-prediction rate;
- equalised-odds difference: the larger of the TPR gap and the FPR gap (fairlearn's definition).

A group with fewer hold-out customers than the region's minimum is suppressed (sent as zeros and
flagged). Because the region also sends its overall histogram, the overall minus the other groups
would give a lone suppressed group back; so further groups are suppressed, smallest first, until the
suppressed ones together hold at least the minimum (secondary suppression, as statistical offices do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcrm.data.io import MISSING, OTHER
from fedcrm.data.schema import BooleanColumn, CategoricalColumn, NumericColumn, Schema, SensitiveAttribute
from fedcrm.evaluation.metrics import auc_from_histograms

# Scores travel at 0.1 resolution per group: rates at the 0.5 threshold (a bin edge) stay exact, AUC is
# exact up to the pairs tied inside one bin, and ECE is off by at most half a bin (0.05). Coarse on
# purpose: every bin of every group carries the DP answer's noise.
FAIR_BINS = 10
CALIBRATION_BINS = 10
# Fewest (noisy) customers behind a group's reported rates.
REPORT_MIN_CUSTOMERS = 50
THRESHOLD = 0.5
_EPS = 1e-7


@dataclass(frozen=True)
class AttributeGroups:
    """One sensitive attribute and its groups, in the order the wire uses."""

    attribute: str
    groups: tuple[str, ...]


def band_labels(bands: tuple[float, ...]) -> list[str]:
    """Names of the bands of a numeric sensitive attribute, as ``fedcrm.data.io`` writes them."""
    edges = list(bands)
    labels = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    return labels + [f">={edges[-1]:g}"]


def _groups_of(s: SensitiveAttribute) -> tuple[str, ...] | None:
    col = s.column
    if isinstance(col, NumericColumn):
        # Every banded attribute has a (missing) band, blanks or not: the answer's shape is the schema's.
        return (*band_labels(s.bands), MISSING) if s.bands else None
    missing = (MISSING,) if col.missing == "indicator" else ()
    if isinstance(col, BooleanColumn):
        return ("yes", "no") + missing
    assert isinstance(col, CategoricalColumn)
    return col.vocabulary + ((OTHER,) if col.unknown == "other" else ()) + missing


def sensitive_groups(schema: Schema) -> list[AttributeGroups]:
    """The attributes that can be reported, each with its groups; a numeric one needs declared bands."""
    out = []
    for s in schema.sensitive:
        groups = _groups_of(s)
        if groups is not None:
            out.append(AttributeGroups(attribute=s.column.name, groups=groups))
    return out


def group_index(values: np.ndarray, *, spec: SensitiveAttribute, groups: tuple[str, ...]) -> np.ndarray:
    """Index into ``groups`` of every customer's value (as ``CustomerTable.sensitive`` holds it)."""
    if isinstance(spec.column, BooleanColumn):
        v = values.astype(float)
        labels = np.where(np.isnan(v), MISSING, np.where(v > 0.5, "yes", "no"))
    else:
        labels = values.astype(str)
    lookup = {g: i for i, g in enumerate(groups)}
    idx = np.array([lookup.get(str(v), -1) for v in labels], dtype=np.int64)
    if (idx < 0).any():
        # Cannot happen for a table read through its schema; a value outside the groups is a bug upstream.
        raise ValueError(f"sensitive attribute {spec.column.name}: values outside its groups {groups}")
    return idx


@dataclass
class GroupHistograms:
    """Per-group hold-out histograms of one attribute; shape (groups, FAIR_BINS). Adds up across regions."""

    hist_pos: np.ndarray
    hist_neg: np.ndarray
    sum_score: np.ndarray
    suppressed: np.ndarray  # how many regions held this group back

    @classmethod
    def empty(cls, n_groups: int) -> GroupHistograms:
        return cls(
            hist_pos=np.zeros((n_groups, FAIR_BINS), dtype=np.int64),
            hist_neg=np.zeros((n_groups, FAIR_BINS), dtype=np.int64),
            sum_score=np.zeros(n_groups, dtype=np.float64),
            suppressed=np.zeros(n_groups, dtype=np.int64),
        )

    @classmethod
    def of(cls, *, scores: np.ndarray, labels: np.ndarray, group: np.ndarray, n_groups: int) -> GroupHistograms:
        p = np.clip(scores.astype(np.float64), _EPS, 1 - _EPS)
        b = np.minimum((p * FAIR_BINS).astype(np.int64), FAIR_BINS - 1)
        out = cls.empty(n_groups)
        y = labels.astype(np.int64)
        np.add.at(out.hist_pos, (group[y == 1], b[y == 1]), 1)
        np.add.at(out.hist_neg, (group[y == 0], b[y == 0]), 1)
        np.add.at(out.sum_score, group, p)
        return out

    @property
    def counts(self) -> np.ndarray:
        return self.hist_pos.sum(axis=1) + self.hist_neg.sum(axis=1)

    def suppress(self, min_customers: int) -> GroupHistograms:
        """Groups below ``min_customers`` zeroed and flagged, plus enough others that no difference reveals them."""
        counts = self.counts
        hide = (counts > 0) & (counts < min_customers)
        if hide.any():
            order = np.argsort(counts, kind="stable")
            for g in order:
                if counts[hide].sum() >= min_customers or hide.all():
                    break
                if not hide[g] and counts[g] > 0:
                    hide[g] = True
        keep = ~hide
        return GroupHistograms(
            hist_pos=self.hist_pos * keep[:, None],
            hist_neg=self.hist_neg * keep[:, None],
            sum_score=self.sum_score * keep,
            suppressed=hide.astype(np.int64),
        )

    def __add__(self, other: GroupHistograms) -> GroupHistograms:
        return GroupHistograms(
            hist_pos=self.hist_pos + other.hist_pos,
            hist_neg=self.hist_neg + other.hist_neg,
            sum_score=self.sum_score + other.sum_score,
            suppressed=self.suppressed + other.suppressed,
        )


FairnessSummary = dict[str, GroupHistograms]


def summarise_groups(
    *, scores: np.ndarray, labels: np.ndarray, sensitive: Any, schema: Schema, min_customers: int
) -> FairnessSummary:
    """A region's per-group histograms of its hold-out, with small groups suppressed."""
    specs = {s.column.name: s for s in schema.sensitive}
    out: FairnessSummary = {}
    for ag in sensitive_groups(schema):
        idx = group_index(np.asarray(sensitive[ag.attribute]), spec=specs[ag.attribute], groups=ag.groups)
        h = GroupHistograms.of(scores=scores, labels=labels, group=idx, n_groups=len(ag.groups))
        out[ag.attribute] = h.suppress(min_customers)
    return out


# -- the wire form: flat lists in the schema's attribute and group order --------------------------


def to_lists(summary: FairnessSummary, *, schema: Schema) -> dict[str, list[float] | list[int]]:
    """Flatten into four lists (histograms of positives and negatives, score sums, suppressed flags)."""
    parts = [summary[ag.attribute] for ag in sensitive_groups(schema)]
    if not parts:
        return {}
    return {
        "hist_pos": np.concatenate([p.hist_pos.ravel() for p in parts]).tolist(),
        "hist_neg": np.concatenate([p.hist_neg.ravel() for p in parts]).tolist(),
        "sum_score": np.concatenate([p.sum_score for p in parts]).tolist(),
        "suppressed": np.concatenate([p.suppressed for p in parts]).tolist(),
    }


def from_lists(*, hist_pos: Any, hist_neg: Any, sum_score: Any, suppressed: Any, schema: Schema) -> FairnessSummary:
    """The inverse of :func:`to_lists`; raises ValueError when the lengths do not fit the schema."""
    layout = sensitive_groups(schema)
    n_groups = sum(len(ag.groups) for ag in layout)
    # Noisy DP answers: floats, kept unclipped (clipping at zero would bias every rate upwards).
    hp, hn = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    ss = np.asarray(sum_score, dtype=np.float64)
    sup = np.asarray(suppressed, dtype=np.int64)
    if hp.size != n_groups * FAIR_BINS or hn.size != hp.size or ss.size != n_groups or sup.size != n_groups:
        raise ValueError(f"fairness histograms do not fit the schema's {n_groups} groups")
    out: FairnessSummary = {}
    g0 = 0
    for ag in layout:
        g1 = g0 + len(ag.groups)
        out[ag.attribute] = GroupHistograms(
            hist_pos=hp[g0 * FAIR_BINS : g1 * FAIR_BINS].reshape(-1, FAIR_BINS),
            hist_neg=hn[g0 * FAIR_BINS : g1 * FAIR_BINS].reshape(-1, FAIR_BINS),
            sum_score=ss[g0:g1],
            suppressed=sup[g0:g1],
        )
        g0 = g1
    return out


def add(a: FairnessSummary, b: FairnessSummary) -> FairnessSummary:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


# -- metrics ---------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def group_metrics(hist_pos: np.ndarray, hist_neg: np.ndarray, sum_score: float) -> dict[str, float]:
    """Rates at the 0.5 threshold, AUC and calibration of one group."""
    cut = int(round(THRESHOLD * FAIR_BINS))
    n_pos, n_neg = float(hist_pos.sum()), float(hist_neg.sum())
    n = n_pos + n_neg
    tp, fp = float(hist_pos[cut:].sum()), float(hist_neg[cut:].sum())
    # Expected calibration error over CALIBRATION_BINS, with each fine bin's centre as its mean score
    # (off by at most half a fine bin, 0.5 / FAIR_BINS).
    centres = (np.arange(FAIR_BINS) + 0.5) / FAIR_BINS
    coarse = np.arange(FAIR_BINS) * CALIBRATION_BINS // FAIR_BINS
    obs = np.bincount(coarse, weights=hist_pos, minlength=CALIBRATION_BINS)
    pred = np.bincount(coarse, weights=(hist_pos + hist_neg) * centres, minlength=CALIBRATION_BINS)
    ece = float(np.abs(pred - obs).sum() / n) if n > 0 else float("nan")
    mean_score = _ratio(sum_score, n)
    observed = _ratio(n_pos, n)
    return {
        "customers": n,
        "positive_prediction_rate": _ratio(tp + fp, n),
        "tpr": _ratio(tp, n_pos),
        "fpr": _ratio(fp, n_neg),
        "auc": auc_from_histograms(hist_pos, hist_neg),
        "mean_score": mean_score,
        "observed_rate": observed,
        "calibration_gap": mean_score - observed,
        "ece": ece,
    }


def _spread(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(max(vals) - min(vals)) if len(vals) >= 2 else float("nan")


def fairness_report(summary: FairnessSummary, *, schema: Schema) -> dict[str, Any]:
    """Per attribute: per-group metrics and the gaps between the groups that have customers."""
    report: dict[str, Any] = {}
    for ag in sensitive_groups(schema):
        h = summary.get(ag.attribute)
        if h is None:
            continue
        groups: dict[str, dict[str, float]] = {}
        suppressed: dict[str, int] = {}
        for i, name in enumerate(ag.groups):
            if h.suppressed[i]:
                suppressed[name] = int(h.suppressed[i])
            # The counts are DP answers: a group whose noisy count is small gives rates that are mostly
            # noise, so it is left out (decided on the noisy count: post-processing, no privacy cost).
            if h.hist_pos[i].sum() + h.hist_neg[i].sum() >= REPORT_MIN_CUSTOMERS:
                groups[name] = group_metrics(h.hist_pos[i], h.hist_neg[i], float(h.sum_score[i]))
        m = list(groups.values())
        tpr_gap = _spread([g["tpr"] for g in m])
        fpr_gap = _spread([g["fpr"] for g in m])
        report[ag.attribute] = {
            "groups": groups,
            "suppressed_in_regions": suppressed,
            "demographic_parity_difference": _spread([g["positive_prediction_rate"] for g in m]),
            "equalized_odds_difference": float(np.nanmax([tpr_gap, fpr_gap]))
            if not (math.isnan(tpr_gap) and math.isnan(fpr_gap))
            else float("nan"),
            "tpr_difference": tpr_gap,
            "fpr_difference": fpr_gap,
            "auc_difference": _spread([g["auc"] for g in m]),
            "calibration_gap_difference": _spread([g["calibration_gap"] for g in m]),
            "threshold": THRESHOLD,
        }
    return _json_safe(report)


def _json_safe(value: Any) -> Any:
    """NaN (a rate with no customers behind it) as null, so summary.json stays standard JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
