"""The synthetic CRM generator: deterministic, shifted per region, defective as declared, and truthful.

The label check is a reference test: it encodes the CSVs here, from the *schema's* declared bounds and
the encoding rules written in ground_truth.json, and lets scikit-learn fit the coefficients back. It
reads the CSVs with pandas only, so it does not lean on fedcrm's own loader or encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2_contingency, f_oneway
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedcrm.data.schema import CategoricalColumn, NumericColumn, Schema, load_schema
from fedcrm.data.synthetic import DefectRates, SynthManifest, generate
from fedcrm.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "configs" / "schemas" / "synthetic_crm.yaml"


@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema(SCHEMA_PATH)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthManifest]:
    """Eight regions of 10k customers: enough rows that estimates sit well inside the tolerances."""
    out = tmp_path_factory.mktemp("synth")
    return out, generate(regions=8, customers=10_000, seed=7, out_dir=out)


def read_region(out: Path, name: str) -> pd.DataFrame:
    # Everything as text, as a CRM export is: blanks stay "" and spellings stay as written.
    return pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)


def read_all(out: Path, manifest: SynthManifest) -> pd.DataFrame:
    return pd.concat([read_region(out, r.name).assign(_region=r.name) for r in manifest.regions], ignore_index=True)


def defect_masks(df: pd.DataFrame, schema: Schema) -> dict[str, pd.Series]:
    """Each defect, recognised from the table and the schema alone (not from the generator's code)."""
    plan = next(c for c in schema.features if c.name == "plan")
    assert isinstance(plan, CategoricalColumn)
    return {
        "blank_monthly_spend": df["monthly_spend"] == "",
        "negative_tenure": pd.to_numeric(df["tenure_months"]) < 0,
        "logins_over_max": pd.to_numeric(df["logins_last_30d"]) > 100,
        "unknown_plan_spelling": ~df["plan"].isin(plan.vocabulary),
    }


def any_defect(df: pd.DataFrame, schema: Schema) -> pd.Series:
    return pd.concat(list(defect_masks(df, schema).values()), axis=1).any(axis=1)


def encode_reference(df: pd.DataFrame, schema: Schema, truth: dict[str, Any]) -> pd.DataFrame:
    """Clean rows in the ground truth's units, computed from the schema's declarations."""
    cols = {c.name: c for c in schema.features}
    out: dict[str, Any] = {}
    for term in truth["coefficients"]:
        name, _, level = term.partition("=")
        col = cols[name]
        if isinstance(col, NumericColumn):
            x = np.clip(pd.to_numeric(df[name]).to_numpy(float), col.min, col.max) - col.min
            out[term] = np.log1p(x) / np.log1p(col.max - col.min) if col.log else x / (col.max - col.min)
        elif level:
            out[term] = (df[name] == level).to_numpy(float)
        else:
            out[term] = df[name].isin(col.true_values).to_numpy(float)
    return pd.DataFrame(out, index=df.index)


def coefficient_mismatches(fitted: dict[str, float], truth: dict[str, float]) -> list[str]:
    """Terms whose fitted coefficient has the wrong sign or is far from the truth."""
    bad = []
    for term, true in truth.items():
        got = fitted[term]
        if abs(true) >= 0.25 and np.sign(got) != np.sign(true):
            bad.append(f"{term}: sign of {got:.2f} differs from true {true}")
        elif abs(got - true) > 0.2 + 0.1 * abs(true):
            bad.append(f"{term}: fitted {got:.2f} is far from true {true}")
    return bad


# --- determinism ----------------------------------------------------------------------------------


def test_same_arguments_write_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    args: dict[str, Any] = {"regions": ["north", "south", "east"], "customers": [300, 500, 200]}
    generate(**args, seed=3, out_dir=tmp_path / "a")
    generate(**args, seed=3, out_dir=tmp_path / "b")
    generate(**args, seed=4, out_dir=tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["east.csv", "ground_truth.json", "manifest.json", "north.csv", "south.csv"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in ("north.csv", "south.csv", "east.csv", "ground_truth.json"):
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f


def test_a_region_table_depends_only_on_seed_name_and_rows_not_on_other_regions(tmp_path: Path) -> None:
    generate(regions=["eu", "us", "apac"], customers=400, seed=11, out_dir=tmp_path / "three")
    generate(regions=["us"], customers=400, seed=11, out_dir=tmp_path / "one")
    assert (tmp_path / "three" / "us.csv").read_bytes() == (tmp_path / "one" / "us.csv").read_bytes()


def test_integer_regions_are_named_region_000_onwards(tmp_path: Path) -> None:
    manifest = generate(regions=3, customers=50, seed=0, out_dir=tmp_path)
    assert [r.name for r in manifest.regions] == ["region-000", "region-001", "region-002"]
    assert all((tmp_path / f"region-00{i}.csv").exists() for i in range(3))


# --- schema agreement -----------------------------------------------------------------------------


def test_every_generated_column_is_declared_in_the_schema_and_vice_versa(
    dataset: tuple[Path, SynthManifest], schema: Schema
) -> None:
    out, manifest = dataset
    header = list(read_region(out, manifest.regions[0].name).columns)
    assert len(header) == len(set(header))
    assert set(header) == set(schema.columns_read())
    assert manifest.schema == schema.name


def test_every_value_is_valid_for_the_schema_unless_it_is_a_counted_defect(
    dataset: tuple[Path, SynthManifest], schema: Schema
) -> None:
    out, manifest = dataset
    df = read_all(out, manifest)
    clean = df[~any_defect(df, schema)]
    for col in schema.model_columns + tuple(s.column for s in schema.sensitive):
        values = clean[col.name]
        if isinstance(col, NumericColumn):
            x = pd.to_numeric(values)
            assert x.notna().all() and x.between(col.min, col.max).all(), col.name
        elif isinstance(col, CategoricalColumn):
            assert set(values) <= set(col.vocabulary), col.name
        else:
            assert set(values) <= set(col.true_values) | set(col.false_values), col.name
    assert set(df[schema.label.column]) == set(schema.label.positive) | set(schema.label.negative)
    for c in schema.consent:
        assert set(df[c.column]) <= set(c.granted) | set(c.refused), c.column
    # Sensitive columns are kept for fairness reports, never as features.
    assert not any(s.use_as_feature for s in schema.sensitive)
    assert {s.column.name for s in schema.sensitive} == {"gender", "age"}


# --- ids, rates, shift ----------------------------------------------------------------------------


def test_customer_ids_are_unique_across_all_regions(dataset: tuple[Path, SynthManifest]) -> None:
    out, manifest = dataset
    ids = read_all(out, manifest)["customer_id"]
    assert len(ids) == manifest.rows == sum(r.rows for r in manifest.regions)
    assert ids.is_unique


def test_manifest_rates_match_the_written_tables(dataset: tuple[Path, SynthManifest]) -> None:
    out, manifest = dataset
    stored = json.loads((out / "manifest.json").read_text())
    assert stored == json.loads(json.dumps(manifest.to_dict()))
    for r in manifest.regions:
        df = read_region(out, r.name)
        assert len(df) == r.rows
        assert r.label_rate == pytest.approx((df["churned"] == "1").mean(), abs=1e-6)
        for c in ("consent_churn", "consent_marketing"):
            assert r.consent_rates[c] == pytest.approx((df[c] == "yes").mean(), abs=1e-6)


def test_overall_churn_rate_is_between_20_and_30_percent_at_scale(tmp_path: Path) -> None:
    manifest = generate(regions=100, customers=500, seed=5, out_dir=tmp_path)
    assert 0.20 <= manifest.label_rate <= 0.30
    assert len(list(tmp_path.glob("*.csv"))) == 100


def test_regions_differ_in_churn_rate_feature_means_and_plan_mix_beyond_noise(
    dataset: tuple[Path, SynthManifest],
) -> None:
    out, manifest = dataset
    df = read_all(out, manifest)
    churn = pd.crosstab(df["_region"], df["churned"])
    assert chi2_contingency(churn).pvalue < 1e-9
    plan_mix = pd.crosstab(df["_region"], df["plan"])
    assert chi2_contingency(plan_mix).pvalue < 1e-9
    for feature in ("tenure_months", "monthly_spend", "logins_last_30d"):
        groups = [pd.to_numeric(g[feature].replace("", np.nan)).dropna() for _, g in df.groupby("_region")]
        assert f_oneway(*groups).pvalue < 1e-9, feature
    rates = [r.label_rate for r in manifest.regions]
    assert max(rates) - min(rates) > 0.05
    truth = json.loads((out / "ground_truth.json").read_text())
    assert len(set(truth["intercepts"].values())) == len(manifest.regions)


def test_consent_rates_are_in_range_and_vary_by_region(dataset: tuple[Path, SynthManifest]) -> None:
    _, manifest = dataset
    churn = [r.consent_rates["consent_churn"] for r in manifest.regions]
    marketing = [r.consent_rates["consent_marketing"] for r in manifest.regions]
    assert all(0.85 <= c <= 0.95 for c in churn), churn
    assert all(0.60 <= m <= 0.80 for m in marketing), marketing
    assert max(churn) - min(churn) > 0.02
    assert max(marketing) - min(marketing) > 0.04


# --- defects --------------------------------------------------------------------------------------


def test_defects_are_present_at_the_declared_low_rates_and_counted_in_the_manifest(
    dataset: tuple[Path, SynthManifest], schema: Schema
) -> None:
    out, manifest = dataset
    declared = manifest.defect_rates
    assert set(declared) == {
        "blank_monthly_spend",
        "negative_tenure",
        "logins_over_max",
        "unknown_plan_spelling",
    }
    totals = dict.fromkeys(declared, 0)
    for r in manifest.regions:
        masks = defect_masks(read_region(out, r.name), schema)
        assert {k: int(m.sum()) for k, m in masks.items()} == r.defect_counts, r.name
        for k in totals:
            totals[k] += r.defect_counts[k]
    for k, rate in declared.items():
        assert 0.005 <= rate <= 0.02, k
        expected = rate * manifest.rows
        assert abs(totals[k] - expected) < 5 * np.sqrt(expected), (k, totals[k], expected)


def test_unknown_plan_spellings_look_like_a_crm_export_and_no_defects_when_disabled(
    dataset: tuple[Path, SynthManifest], schema: Schema, tmp_path: Path
) -> None:
    out, manifest = dataset
    df = read_all(out, manifest)
    odd = set(df.loc[defect_masks(df, schema)["unknown_plan_spelling"], "plan"])
    assert {"premium+", "Standard plan", "gold"} <= odd
    known = {"basic", "standard", "premium", "bronze", "silver", "gold"}
    assert all(s.lower().replace(" plan", "").rstrip("+") in known for s in odd)
    # Unknown to the loader too, which strips cells: no spelling is a vocabulary entry once stripped.
    plan = next(c for c in schema.features if c.name == "plan")
    assert isinstance(plan, CategoricalColumn)
    assert not {s.strip() for s in odd} & set(plan.vocabulary)
    clean = generate(regions=2, customers=3000, seed=7, out_dir=tmp_path, defects=DefectRates.none())
    assert all(not any(r.defect_counts.values()) for r in clean.regions)
    for r in clean.regions:
        assert not any_defect(read_region(tmp_path, r.name), schema).any()


# --- the label follows the declared model ---------------------------------------------------------


def test_label_depends_on_the_features_as_the_ground_truth_declares(
    dataset: tuple[Path, SynthManifest], schema: Schema
) -> None:
    out, manifest = dataset
    truth = json.loads((out / "ground_truth.json").read_text())
    df = read_all(out, manifest)
    df = df[~any_defect(df, schema)]
    x = encode_reference(df, schema, truth)
    y = (df["churned"] == "1").to_numpy(int)
    # Region dummies stand in for the per-region intercepts, so shift is not read as a feature effect.
    regions = pd.get_dummies(df["_region"], dtype=float)
    model = LogisticRegression(C=np.inf, max_iter=5000, fit_intercept=False)
    model.fit(pd.concat([x, regions], axis=1).to_numpy(), y)
    fitted = dict(zip(x.columns, model.coef_[0][: x.shape[1]], strict=True))
    assert coefficient_mismatches(fitted, truth["coefficients"]) == []
    # The check has power: a truth with one flipped sign is caught.
    wrong = dict(truth["coefficients"], logins_last_30d=4.0)
    assert any("logins_last_30d" in m for m in coefficient_mismatches(fitted, wrong))
    fitted_intercepts = dict(zip(regions.columns, model.coef_[0][x.shape[1] :], strict=True))
    for name, b in truth["intercepts"].items():
        assert fitted_intercepts[name] == pytest.approx(b, abs=0.3), name


def test_the_ground_truth_model_ranks_churners_well_above_chance(
    dataset: tuple[Path, SynthManifest], schema: Schema
) -> None:
    out, manifest = dataset
    truth = json.loads((out / "ground_truth.json").read_text())
    df = read_all(out, manifest)
    df = df[~any_defect(df, schema)]
    x = encode_reference(df, schema, truth)
    logits = x.to_numpy() @ np.array(list(truth["coefficients"].values()))
    logits += df["_region"].map(truth["intercepts"]).to_numpy()
    y = (df["churned"] == "1").to_numpy(int)
    assert roc_auc_score(y, logits) > 0.75
    # Calibrated, not only ranked: the mean predicted rate matches the observed one.
    assert np.mean(1 / (1 + np.exp(-logits))) == pytest.approx(y.mean(), abs=0.01)


# --- speed and argument errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regions": 0, "customers": 10}, "regions must be >= 1"),
        ({"regions": "eu", "customers": 10}, "list of names"),
        ({"regions": ["eu", "eu"], "customers": 10}, "unique"),
        ({"regions": ["eu/west"], "customers": 10}, "region name"),
        ({"regions": 2, "customers": [10, 20, 30]}, "one per region"),
        ({"regions": 2, "customers": 0}, ">= 1"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_the_problem(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        generate(**kwargs, seed=0, out_dir=tmp_path)


def test_refuses_a_folder_holding_other_region_tables(tmp_path: Path) -> None:
    generate(regions=3, customers=20, seed=0, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="region-002.csv"):
        generate(regions=2, customers=20, seed=0, out_dir=tmp_path)
    generate(regions=3, customers=20, seed=1, out_dir=tmp_path)  # regenerating the same regions is fine


def test_negative_seed_and_bad_defect_rates_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seed"):
        generate(regions=1, customers=10, seed=-1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="negative_tenure"):
        DefectRates(negative_tenure=1.5)
