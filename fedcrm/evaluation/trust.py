"""What a region reports about the served model beyond accuracy: fairness per group, feature importance.

Both are sums over the region's hold-out customers, so the server adds them up across regions:
per-group score histograms (see :mod:`fedcrm.evaluation.fairness`) and, per source column, the sum of
|contribution| to the scores (see :mod:`fedcrm.evaluation.explain`). This module turns them into
the wire's metric values and back; the keys are the wire vocabulary's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcrm import wire
from fedcrm.data.schema import Schema
from fedcrm.evaluation import fairness


@dataclass
class TrustSummary:
    groups: fairness.FairnessSummary
    importance_sum: np.ndarray
    customers: int

    def to_metrics(self, *, schema: Schema) -> dict[str, Any]:
        lists = fairness.to_lists(self.groups, schema=schema)
        out: dict[str, Any] = {
            wire.IMPORTANCE_SUM: self.importance_sum.astype(float).tolist(),
            wire.IMPORTANCE_CUSTOMERS: float(self.customers),
        }
        if lists:
            out |= {
                wire.FAIR_HIST_POS: lists["hist_pos"],
                wire.FAIR_HIST_NEG: lists["hist_neg"],
                wire.FAIR_SUM_SCORE: lists["sum_score"],
                wire.FAIR_SUPPRESSED: lists["suppressed"],
            }
        return out


@dataclass
class PooledTrust:
    """The regions' trust metrics added up; ``report`` gives the summary.json sections."""

    groups: fairness.FairnessSummary
    importance_sum: np.ndarray | None = None
    customers: float = 0.0
    regions: int = 0

    def add_metrics(self, metrics: Mapping[str, Any], *, schema: Schema) -> None:
        """Add one region's reply; raises ValueError when it does not fit the schema."""
        if wire.FAIR_HIST_POS in metrics:
            part = fairness.from_lists(
                hist_pos=metrics[wire.FAIR_HIST_POS],
                hist_neg=metrics[wire.FAIR_HIST_NEG],
                sum_score=metrics[wire.FAIR_SUM_SCORE],
                suppressed=metrics[wire.FAIR_SUPPRESSED],
                schema=schema,
            )
            self.groups = fairness.add(self.groups, part)
        if wire.IMPORTANCE_SUM in metrics:
            s = np.asarray(metrics[wire.IMPORTANCE_SUM], dtype=np.float64)
            if self.importance_sum is not None and s.shape != self.importance_sum.shape:
                raise ValueError("feature importance of a different length than the other regions'")
            self.importance_sum = s if self.importance_sum is None else self.importance_sum + s
            self.customers += float(metrics.get(wire.IMPORTANCE_CUSTOMERS, 0.0))
            self.regions += 1

    def report(self, *, schema: Schema) -> dict[str, Any]:
        out: dict[str, Any] = {"fairness": fairness.fairness_report(self.groups, schema=schema)}
        if self.importance_sum is not None:
            # explain's module imports torch (for its attributions); a region's data path imports this one.
            from fedcrm.evaluation.explain import importance_report

            out["feature_importance"] = {
                "mean_abs_contribution_points": importance_report(self.importance_sum, self.customers, schema=schema),
                "customers": self.customers,
                "regions": self.regions,
                "reference": "contributions against the schema's reference customer (fedcrm.evaluation.explain)",
            }
        return out
