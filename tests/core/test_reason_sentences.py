"""`fedcrm score --reasons` words a whole chunk at once: the same sentences, character for character,
as the one-customer path (``Contribution.sentence`` of ``ScoringModel.reasons``), on the cases where
a bulk shortcut could differ: ties, halves in the points, -0.0, NaN, unknown and missing values,
whitespace in the cells, more reasons than columns, an empty chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from fedcrm.config import ModelConfig, load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.explain import Contribution, one_decimal, sentences_by_rank, value_text
from fedcrm.models import build_model, get_weights
from fedcrm.runs import RunDir
from fedcrm.scoring import ScoringModel, score_region

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
COLUMNS = {c.name: c for c in SCHEMA.model_columns}


def _scalar(columns, values, points: np.ndarray, order: np.ndarray, task: str) -> list[list[str]]:  # noqa: ANN001
    """The one-customer wording, per rank: what `fedcrm score` wrote before it worded chunks."""
    return [
        [
            Contribution(
                column=columns[j].name, value=value_text(columns[j], values[j][i]), points=float(points[i, j])
            ).sentence(task)
            for i in range(points.shape[0])
            for j in [order[i, k]]
        ]
        for k in range(order.shape[1])
    ]


def test_one_decimal_is_python_format_on_halves_neighbours_and_extremes() -> None:
    halves = np.arange(0, 2001) / 20  # every x.x5 up to 100: mostly not exact in binary, so .1f rounds either way
    near = np.concatenate([np.nextafter(halves, np.inf), np.nextafter(halves, -np.inf).clip(0)])
    odd = np.array(
        [0.0, 0.25, 0.35, 0.45, 2.5, 1e-300, 5e-324, 99.95, 999_999.95, 1e6, 1e7 + 0.05, 1e20, np.inf, np.nan]
    )
    rng = np.random.default_rng(0)
    x = np.concatenate([halves, near, odd, rng.uniform(0, 100, 20_000), rng.exponential(1, 5_000)])
    assert one_decimal(x).to_pylist() == [f"{v:.1f}" for v in x.tolist()]


def test_sentences_match_the_one_customer_wording_on_ties_signs_nan_and_odd_values() -> None:
    columns = [COLUMNS[n] for n in ("tenure_months", "monthly_spend", "plan", "autopay")]
    values = [
        np.array([0.0, -0.0, 12.5, 120.0, 1e-7, 3.0]),
        np.array([np.nan, 0.5, 49.99, np.nan, 500.0, 1e5]),
        np.array(["basic", "(other)", "premium", "(missing)", "basic", "standard"], dtype=object),
        np.array([1.0, 0.0, np.nan, 1.0, 0.0, 1.0]),
    ]
    points = np.array(
        [
            [0.35, -0.35, 0.35, 0.0],  # a three-way tie in |points|: the schema's order breaks it
            [-0.0, 0.0, 0.0, -0.0],  # all zero, two of them negative zero ("raised ... by 0.0")
            [np.nan, 12.25, -12.25, 1e-9],  # NaN is "lowered ... by nan", as `>= 0` says
            [99.95, -99.95, 0.05, -0.05],
            [1e7 + 0.05, 2.5, -2.5, 0.15],
            [-100.0, 33.333333, 66.666667, -0.45],
        ]
    )
    order = np.argsort(-np.abs(points), axis=1, kind="stable")
    for task in ("churn", "propensity", "no such purpose"):
        got = sentences_by_rank(columns=columns, values=values, points=points, order=order, task=task)
        assert [a.to_pylist() for a in got] == _scalar(columns, values, points, order, task)


def test_a_column_of_non_text_or_missing_objects_is_worded_row_by_row() -> None:
    columns = [COLUMNS["plan"]]
    values = [np.array([7, "7", None, True, 1, "basic"], dtype=object)]  # 7 == 7.0 == True would merge by value
    points = np.arange(6, dtype=float).reshape(6, 1)
    order = np.zeros((6, 1), dtype=np.int64)
    got = sentences_by_rank(columns=columns, values=values, points=points, order=order, task="churn")
    assert [a.to_pylist() for a in got] == _scalar(columns, values, points, order, "churn")


def test_an_empty_chunk_gives_empty_ranks() -> None:
    columns = [COLUMNS["plan"], COLUMNS["tenure_months"]]
    values = [np.array([], dtype=object), np.array([], dtype=float)]
    got = sentences_by_rank(
        columns=columns, values=values, points=np.empty((0, 2)), order=np.empty((0, 2), dtype=np.int64), task="churn"
    )
    assert [a.to_pylist() for a in got] == [[], []]


@pytest.fixture
def scorer(tmp_path: Path) -> ScoringModel:
    """A served logistic model whose weights tie: only the three yes/no columns count, equally."""
    cfg = load_config(REPO / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"model": ModelConfig(kind="logistic")})
    enc = FeatureEncoder(SCHEMA)
    weights = get_weights(build_model(cfg.model, n_features=enc.n_features, seed=0))
    w = np.zeros_like(weights["out.weight"])
    for j, slot in enumerate(enc.slots):
        w[0, j] = 2.0 if slot.column in ("autopay", "paperless", "multi_device") else 0.0
    weights = {**weights, "out.weight": w}
    RunDir.create(tmp_path / "run", cfg).save_model(
        constituents={0: weights}, feature_names=enc.feature_names, version=1
    )
    return ScoringModel.load(tmp_path / "run", schema=REPO / "configs" / "schemas" / "synthetic_crm.yaml")


def _table(path: Path) -> Path:
    header = (
        "customer_id,tenure_months,monthly_spend,support_tickets,logins_last_30d,nps_score,days_since_last_purchase,"
        "plan,contract,channel,payment_method,autopay,paperless,multi_device,gender,age,consent_churn,"
        "consent_marketing,churned"
    )
    rows = [
        "a-1,8,45.74,2,14,-6,100,basic,month-to-month,phone,direct_debit,yes,yes,no,M,39,yes,yes,0",
        "a-2, 69 ,,2,14,-8,31,  gold ,one-year,web,card,no,no,yes,F,37,yes,no,1",  # whitespace, blank, unknown
        "a-3,-0,0.0,0,0,0,0,premium+,two-year,store,invoice,yes,no,no,X,18,yes,yes,0",  # -0, zeros
        "a-4,200,9999,99,500,100,9999,standard,one-year,partner,paypal,no,yes,yes,F,95,yes,yes,1",  # clipped
    ]
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("top", [1, 3, 13, 20])
def test_the_model_words_each_chunk_as_it_words_each_customer(scorer: ScoringModel, tmp_path: Path, top: int) -> None:
    table = load_table(_table(tmp_path / "t.csv"), SCHEMA)
    one_by_one = [[c.sentence(scorer.task) for c in r] for r in scorer.reasons(table, top=top)]
    bulk = [a.to_pylist() for a in scorer.reason_sentences(table, top=top)]
    assert len(bulk) == min(top, 13)  # 13 model columns: no more reasons than that
    assert [list(r) for r in zip(*bulk, strict=True)] == one_by_one
    if top >= 13:  # every column worded: the unknown plan as the other bucket, the blank spend as missing
        assert {
            "plan: (other) raised churn risk by 0.0 points",
            "monthly_spend: (missing) raised churn risk by 0.0 points",
        } <= {r[1] for r in bulk}


def test_score_writes_empty_reasons_beyond_the_model_columns(scorer: ScoringModel, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    score_region(
        region="eu", model=scorer, data=_table(tmp_path / "t.csv"), state_dir=tmp_path / "state", out=out, reasons=15
    )
    scores = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(scores.columns[-3:]) == ["reason_13", "reason_14", "reason_15"]
    assert (scores["reason_14"] == "").all() and (scores["reason_13"] != "").all()
    # Ties: autopay, paperless and multi_device moved a-1's score by the same points, in schema order.
    assert scores.loc[0, "reason_1"].startswith("autopay: yes raised churn risk by")
    assert scores.loc[0, "reason_2"].startswith("paperless: yes raised churn risk by")
