"""Pooled metrics from per-region histograms against scikit-learn on the pooled predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

from fedcrm.evaluation.metrics import ScoreSummary


def test_pooled_auc_from_region_histograms_matches_sklearn_on_pooled_scores() -> None:
    rng = np.random.default_rng(0)
    regions = []
    for shift, n in ((0.0, 3000), (0.8, 1500), (-0.5, 800)):
        y = rng.random(n) < 0.3
        logits = rng.normal(size=n) + 1.2 * y + shift
        regions.append((1 / (1 + np.exp(-logits)), y.astype(int)))
    pooled = sum((ScoreSummary.of(scores=s, labels=y) for s, y in regions), ScoreSummary()).metrics()
    scores = np.concatenate([s for s, _ in regions])
    labels = np.concatenate([y for _, y in regions])
    assert pooled["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    assert pooled["log_loss"] == pytest.approx(log_loss(labels, scores), rel=1e-6)
    assert pooled["brier"] == pytest.approx(brier_score_loss(labels, scores), rel=1e-6)
    assert pooled["accuracy"] == pytest.approx(accuracy_score(labels, scores >= 0.5))
    # The mean of regional AUCs is a different number: pooling must not average.
    mean_regional = np.mean([roc_auc_score(y, s) for s, y in regions])
    assert abs(mean_regional - pooled["auc"]) > 0.01


def test_auc_ties_inside_a_bin_count_one_half() -> None:
    s = ScoreSummary.of(scores=np.array([0.5, 0.5, 0.5, 0.5]), labels=np.array([1, 0, 1, 0]))
    assert s.metrics()["auc"] == pytest.approx(0.5)


def test_auc_is_nan_with_one_class_only() -> None:
    s = ScoreSummary.of(scores=np.array([0.2, 0.9]), labels=np.array([1, 1]))
    assert np.isnan(s.metrics()["auc"])
