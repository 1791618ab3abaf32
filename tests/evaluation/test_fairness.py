"""Fairness from per-group histograms, checked against fairlearn / scikit-learn on pooled predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from sklearn.metrics import roc_auc_score

from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.synthetic import generate
from fedcrm.evaluation import fairness
from fedcrm.evaluation.fairness import FAIR_BINS, GroupHistograms

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")


def _region(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    gender = rng.choice(["F", "M"], size=n)
    age = rng.choice(["<30", "30-45", "45-60", ">=60"], size=n)
    y = (rng.random(n) < np.where(gender == "F", 0.3, 0.45)).astype(np.int64)
    # Scores depend on label and group, so the groups really differ.
    scores = 1 / (1 + np.exp(-(1.5 * y - 0.8 + 0.4 * (gender == "M") + rng.normal(0, 1, n))))
    return scores, y, {"gender": gender, "age": age}


def test_pooled_group_metrics_match_fairlearn_on_pooled_predictions() -> None:
    fl_metrics = pytest.importorskip("fairlearn.metrics")
    rng = np.random.default_rng(0)
    regions = [_region(rng, n) for n in (900, 600, 1200)]
    pooled: fairness.FairnessSummary = {}
    for scores, y, sensitive in regions:
        part = fairness.summarise_groups(scores=scores, labels=y, sensitive=sensitive, schema=SCHEMA, min_customers=20)
        # Through the wire form and back, as the server receives it.
        wire_form = fairness.to_lists(part, schema=SCHEMA)
        pooled = fairness.add(pooled, fairness.from_lists(**wire_form, schema=SCHEMA))
    report = fairness.fairness_report(pooled, schema=SCHEMA)

    scores = np.concatenate([r[0] for r in regions])
    y = np.concatenate([r[1] for r in regions])
    y_pred = (scores >= 0.5).astype(int)
    for attr in ("gender", "age"):
        groups = np.concatenate([r[2][attr] for r in regions])
        rep = report[attr]
        frame = fl_metrics.MetricFrame(
            metrics={
                "ppr": fl_metrics.selection_rate,
                "tpr": fl_metrics.true_positive_rate,
                "fpr": fl_metrics.false_positive_rate,
            },
            y_true=y,
            y_pred=y_pred,
            sensitive_features=groups,
        )
        for g, row in frame.by_group.iterrows():
            m = rep["groups"][g]
            assert m["positive_prediction_rate"] == pytest.approx(row["ppr"], abs=1e-12)
            assert m["tpr"] == pytest.approx(row["tpr"], abs=1e-12)
            assert m["fpr"] == pytest.approx(row["fpr"], abs=1e-12)
            sel = groups == g
            assert m["customers"] == sel.sum()
            assert m["mean_score"] == pytest.approx(np.clip(scores[sel], 1e-7, 1 - 1e-7).mean(), abs=1e-9)
            assert m["observed_rate"] == pytest.approx(y[sel].mean(), abs=1e-12)
            assert m["calibration_gap"] == pytest.approx(m["mean_score"] - m["observed_rate"], abs=1e-12)
            # The AUC is exactly scikit-learn's on the scores rounded down to their 1/FAIR_BINS bin (ties
            # count one half in both), and differs from the exact AUC only by the pairs tied in one bin.
            b = np.minimum((scores[sel] * FAIR_BINS).astype(int), FAIR_BINS - 1)
            assert m["auc"] == pytest.approx(roc_auc_score(y[sel], b), abs=1e-12)
            pos, neg = b[y[sel] == 1], b[y[sel] == 0]
            tied = sum(int((neg == k).sum()) * int((pos == k).sum()) for k in np.unique(pos))
            bound = 0.5 * tied / (len(pos) * len(neg))
            assert abs(m["auc"] - roc_auc_score(y[sel], scores[sel])) <= bound + 1e-12
            # ECE over equal-width bins, exactly from the scores; the report puts each customer at its
            # bin's centre, which moves every bin's predicted mass by at most half a bin's width.
            p = np.clip(scores[sel], 1e-7, 1 - 1e-7)
            pb = np.minimum((p * FAIR_BINS).astype(int), FAIR_BINS - 1)
            gap = np.bincount(pb, weights=p - y[sel], minlength=FAIR_BINS)
            exact_ece = np.abs(gap).sum() / sel.sum()
            assert abs(m["ece"] - exact_ece) <= 0.5 / FAIR_BINS
        assert rep["demographic_parity_difference"] == pytest.approx(
            fl_metrics.demographic_parity_difference(y, y_pred, sensitive_features=groups), abs=1e-12
        )
        assert rep["equalized_odds_difference"] == pytest.approx(
            fl_metrics.equalized_odds_difference(y, y_pred, sensitive_features=groups), abs=1e-12
        )
    assert report["gender"]["demographic_parity_difference"] > 0.05  # the groups were made to differ


def test_small_group_is_suppressed_and_cannot_be_recovered_by_difference() -> None:
    rng = np.random.default_rng(1)
    n = 200
    group = np.r_[np.zeros(150, int), np.ones(45, int), np.full(5, 2)]  # F, M, X
    h = GroupHistograms.of(scores=rng.random(n), labels=rng.integers(0, 2, n), group=group, n_groups=3)
    s = h.suppress(20)
    # X (5) is below the minimum; M (45) is suppressed too, so overall − F reveals only X+M (50 customers).
    assert s.suppressed.tolist() == [0, 1, 1]
    assert s.counts.tolist() == [150, 0, 0]
    assert s.sum_score[1:].tolist() == [0.0, 0.0]
    # Nothing to hide: nothing suppressed.
    assert h.suppress(5).suppressed.tolist() == [0, 0, 0]


def test_wire_lists_of_wrong_length_are_refused() -> None:
    part = fairness.summarise_groups(
        scores=np.full(4, 0.3),
        labels=np.array([0, 1, 0, 1]),
        sensitive={"gender": np.array(["F"] * 4), "age": np.array(["<30"] * 4)},
        schema=SCHEMA,
        min_customers=1,
    )
    lists = fairness.to_lists(part, schema=SCHEMA)
    lists["hist_pos"] = lists["hist_pos"][:-1]
    with pytest.raises(ValueError, match="do not fit"):
        fairness.from_lists(**lists, schema=SCHEMA)


def test_group_names_are_those_the_table_loader_writes(tmp_path: Path) -> None:
    generate(regions=["eu"], customers=400, seed=3, out_dir=tmp_path)
    table = load_table(tmp_path / "eu.csv", SCHEMA)
    layout = {ag.attribute: set(ag.groups) for ag in fairness.sensitive_groups(SCHEMA)}
    for attr, groups in layout.items():
        assert set(table.sensitive[attr].astype(str)) <= groups, attr
    assert layout["age"] == {"<30", "30-45", "45-60", ">=60", "(missing)"}  # blanks are a band, not an error
    assert layout["gender"] == {"F", "M", "X", "(other)"}
