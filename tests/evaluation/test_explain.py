"""Explanations: exact for logistic, integrated gradients for the MLP, completeness, words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO

from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.synthetic import generate
from fedcrm.evaluation import explain
from fedcrm.models import build_model, ensemble_proba, predict_proba
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import train_locally

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("explain")
    generate(regions=["eu"], customers=400, seed=5, out_dir=d)
    return load_table(d / "eu.csv", SCHEMA)


def _trained(kind: str, x: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    m = build_model(ModelConfig(kind=kind, hidden=(16, 16)), n_features=x.shape[1], seed=seed)
    train_locally(
        m,
        x=x,
        y=y,
        training=TrainingConfig(local_epochs=5, batch_size=64, learning_rate=0.05),
        dp=None,
        randomness=ReleaseRandomness.public_seed(seed),
    )
    return m


def test_reference_customer_comes_from_the_schema_alone() -> None:
    enc = FeatureEncoder(SCHEMA)
    ref = explain.reference_customer(SCHEMA)
    slots = {s.name: ref[j] for j, s in enumerate(enc.slots)}
    assert slots["tenure_months"] == 0.5 and slots["monthly_spend: missing"] == 0.0
    assert slots["autopay"] == 0.5
    assert slots["contract: month-to-month"] == pytest.approx(1 / 3)
    assert slots["plan: (other)"] == 0.0


def test_logistic_contributions_are_exact_and_grouped_by_column(table) -> None:  # noqa: ANN001
    x = FeatureEncoder(SCHEMA).encode(table)
    model = _trained("logistic", x, table.labels, seed=0)
    ref = explain.reference_customer(SCHEMA)
    attr, method = explain.attributions([model], x[:50], ref=ref)
    assert method == "exact (logistic)"
    # Completeness to float precision: Σ contributions = p(x) − p(reference).
    delta = predict_proba(model, x[:50]) - predict_proba(model, ref[None, :])
    np.testing.assert_allclose(attr.sum(axis=1), delta, atol=1e-6)
    # Each slot's share is its share of the logit change, w_j (x_j − r_j), computed here from the weights.
    w = model.out.weight.detach().numpy().ravel().astype(np.float64)
    logit = (x[:50] - ref) * w
    nz = np.abs(logit.sum(axis=1)) > 0.05
    np.testing.assert_allclose(
        attr[nz] / delta[nz, None], logit[nz] / logit[nz].sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6
    )
    # A slow, independent integral of the gradient agrees with the closed form.
    slow = explain._riemann_ig(model, x[:5], ref, steps=2000)
    np.testing.assert_allclose(slow, attr[:5], atol=1e-6)
    names, per_col = explain.by_column(attr, FeatureEncoder(SCHEMA))
    assert names == [c.name for c in SCHEMA.model_columns]
    np.testing.assert_allclose(per_col.sum(axis=1), attr.sum(axis=1), atol=1e-9)


@pytest.mark.parametrize("method", ["captum", "riemann"])
def test_mlp_integrated_gradients_are_complete(table, method: str) -> None:  # noqa: ANN001
    if method == "captum":
        pytest.importorskip("captum")
    x = FeatureEncoder(SCHEMA).encode(table)
    models = [_trained("mlp", x, table.labels, seed=s) for s in (1, 2)]  # a 2-shard served model
    ref = explain.reference_customer(SCHEMA)
    attr, used = explain.attributions(models, x[:40], ref=ref, method=method, steps=128)
    assert "integrated gradients" in used
    delta = ensemble_proba(models, x[:40]) - ensemble_proba(models, ref[None, :])
    assert np.abs(delta).max() > 0.02  # the test is not trivially satisfied by tiny score changes
    np.testing.assert_allclose(attr.sum(axis=1), delta, atol=2e-3)


def test_captum_and_own_integrated_gradients_agree(table) -> None:  # noqa: ANN001
    pytest.importorskip("captum")
    x = FeatureEncoder(SCHEMA).encode(table)
    model = _trained("mlp", x, table.labels, seed=3)
    ref = explain.reference_customer(SCHEMA)
    a, _ = explain.attributions([model], x[:20], ref=ref, method="captum", steps=256)
    b, _ = explain.attributions([model], x[:20], ref=ref, method="riemann", steps=256)
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_explanation_in_the_users_words(table) -> None:  # noqa: ANN001
    x = FeatureEncoder(SCHEMA).encode(table)
    model = _trained("logistic", x, table.labels, seed=0)
    i = 0
    e = explain.explain_customer(
        [model],
        schema=SCHEMA,
        x=x[i],
        values={c: table.values[c].iloc[i] for c in table.values},
        customer_id=str(table.ids[i]),
    )
    assert e.completeness_error < 1e-6
    assert sum(c.points for c in e.contributions) == pytest.approx((e.score - e.reference_score) * 100, abs=1e-4)
    contract = next(c for c in e.contributions if c.column == "contract")
    assert contract.value == table.values["contract"].iloc[i]
    text = contract.sentence("churn")
    assert text.startswith(f"contract: {contract.value} ") and "churn risk by" in text and text.endswith(" points")
    assert ("raised" in text) == (contract.points >= 0)
    top = e.top(3)
    assert [abs(c.points) for c in top] == sorted((abs(c.points) for c in e.contributions), reverse=True)[:3]


def test_importance_sums_add_up_across_regions(table) -> None:  # noqa: ANN001
    x = FeatureEncoder(SCHEMA).encode(table)
    model = _trained("logistic", x, table.labels, seed=0)
    whole = explain.importance_sums([model], schema=SCHEMA, x=x)
    parts = explain.importance_sums([model], schema=SCHEMA, x=x[:150]) + explain.importance_sums(
        [model], schema=SCHEMA, x=x[150:]
    )
    np.testing.assert_allclose(whole, parts, rtol=1e-9)
    rep = explain.importance_report(whole, len(x), schema=SCHEMA)
    assert list(rep.values()) == sorted(rep.values(), reverse=True)
    assert set(rep) == {c.name for c in SCHEMA.model_columns}
