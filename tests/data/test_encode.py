"""The encoder is built from the schema alone: the same customer row encodes to the same vector in
every region and whatever else is in the table, in a fixed order with readable names, inside [0, 1].

Reference values are computed here by hand from the schema's declared bounds and vocabularies.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import Schema, load_schema, schema_from_text
from fedcrm.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "configs" / "schemas"
TELCO = ROOT.parent / "shared" / "data" / "telco_customer_churn.csv"

SCHEMA_YAML = """
name: tiny
delimiter: ","
id: {column: cid}
label: {column: churn, positive: ["yes"], negative: ["no"]}
purposes: [churn]
features:
  - {name: age, type: numeric, min: 18, max: 90}
  - {name: spend, type: numeric, min: 0, max: 100, log: true, missing: indicator}
  - {name: plan, type: categorical, vocabulary: [basic, pro]}
  - {name: autopay, type: boolean, true_values: ["y"], false_values: ["n"], missing: indicator}
  - {name: tier, type: categorical, vocabulary: [a, b], unknown: error, missing: indicator}
sensitive:
  - column: {name: gender, type: categorical, vocabulary: [F, M]}
"""
HEADER = "cid,churn,age,spend,plan,autopay,tier,gender"


@pytest.fixture
def schema() -> Schema:
    return schema_from_text(SCHEMA_YAML)


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def test_names_and_order_are_fixed_by_the_schema_and_readable(schema: Schema) -> None:
    enc = FeatureEncoder(schema)
    assert enc.feature_names == [
        "age",
        "spend",
        "spend: missing",
        "plan: basic",
        "plan: pro",
        "plan: (other)",
        "autopay",
        "autopay: missing",
        "tier: a",
        "tier: b",
        "tier: (missing)",
    ]
    assert enc.n_features == len(enc.slots) == 11
    # Sensitive attributes are not features unless the schema says so.
    assert not any("gender" in n for n in enc.feature_names)


def test_values_match_a_hand_computed_reference(tmp_path: Path, schema: Schema) -> None:
    t = load_table(write(tmp_path / "t.csv", ["c1,yes,54,9,pro,y,b,F", "c2,no,200,,gold,,,M"]), schema)
    x = FeatureEncoder(schema).encode(t)
    assert x.dtype == np.float32
    expected = np.array(
        [
            [(54 - 18) / 72, math.log1p(9) / math.log1p(100), 0, 0, 1, 0, 1, 0, 0, 1, 0],
            [1.0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1],  # age clipped to 90; spend missing; gold -> other
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_the_same_customer_encodes_identically_in_two_regions_whatever_else_they_hold(
    tmp_path: Path, schema: Schema
) -> None:
    customer = "shared,no,33,42.5,basic,n,a,F"
    eu = ["e1,yes,18,0,pro,y,b,M", customer, "e2,no,90,100,basic,y,a,F"]
    us = ["u1,no,70,3,gold,,,M", "u2,yes,25,99.9,pro,n,b,F", "u3,no,19,1,pro,y,a,M", customer]
    enc_eu, enc_us = FeatureEncoder(schema), FeatureEncoder(schema)  # built separately, from the schema alone
    x_eu = enc_eu.encode(load_table(write(tmp_path / "eu.csv", eu), schema))
    x_us = enc_us.encode(load_table(write(tmp_path / "us.csv", us), schema))
    np.testing.assert_array_equal(x_eu[1], x_us[3])
    assert enc_eu.feature_names == enc_us.feature_names


def test_adding_and_removing_rows_does_not_change_the_other_customers_encoding(tmp_path: Path) -> None:
    schema = load_schema(SCHEMAS / "synthetic_crm.yaml")
    generate(regions=["eu"], customers=600, seed=4, out_dir=tmp_path / "gen")
    lines = (tmp_path / "gen" / "eu.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    (tmp_path / "all.csv").write_text("\n".join([header, *rows]) + "\n")
    # Remove every third customer, including the extremes, and add an extreme new one.
    kept = [r for i, r in enumerate(rows) if i % 3]
    extreme = "new-1,-50,499.99,50,100000,100,730,gold,two-year,partner,paypal,yes,yes,yes,X,95,yes,yes,1"
    assert len(extreme.split(",")) == len(header.split(","))
    (tmp_path / "changed.csv").write_text("\n".join([header, extreme, *kept]) + "\n")
    a = load_table(tmp_path / "all.csv", schema)
    b = load_table(tmp_path / "changed.csv", schema)
    enc = FeatureEncoder(schema)
    xa = dict(zip(a.ids, enc.encode(a), strict=True))
    xb = dict(zip(b.ids, enc.encode(b), strict=True))
    common = sorted(set(xa) & set(xb))
    assert len(common) == 400
    for cid in common:
        np.testing.assert_array_equal(xa[cid], xb[cid], err_msg=cid)


def test_values_lie_in_unit_interval_and_one_hot_groups_sum_to_one(tmp_path: Path) -> None:
    schema = load_schema(SCHEMAS / "synthetic_crm.yaml")
    generate(regions=["eu"], customers=3000, seed=9, out_dir=tmp_path)  # carries out-of-bounds defects
    t = load_table(tmp_path / "eu.csv", schema)
    enc = FeatureEncoder(schema)
    x = enc.encode(t)
    assert x.shape == (3000, enc.n_features)
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    # Clipped values (logins over 100, tenure -1) sit exactly on the declared bounds.
    assert t.report.columns["logins_last_30d"].clipped_high > 0 and t.report.columns["tenure_months"].clipped_low > 0
    assert x[:, enc.feature_names.index("logins_last_30d")].max() == 1.0
    assert x[:, enc.feature_names.index("tenure_months")].min() == 0.0
    for col in ("plan", "contract", "channel", "payment_method"):
        idx = [i for i, s in enumerate(enc.slots) if s.column == col]
        np.testing.assert_array_equal(x[:, idx].sum(axis=1), 1.0)
    other = enc.feature_names.index("plan: (other)")
    assert x[:, other].sum() == sum(t.report.columns["plan"].unknown_categories.values()) > 0


def test_dimension_equals_the_declared_slots_of_every_shipped_schema() -> None:
    expected = {
        # 6 numeric + 1 indicator, 3+1 + 3+1 + 4+1 + 4+1 categories, 3 booleans
        "synthetic_crm": 6 + 1 + 4 + 4 + 5 + 5 + 3,
        # 3 numeric + 1 indicator, 4 booleans, 8 * (3+1) + (3+1) + (4+1) categories
        "telco_churn": 3 + 1 + 4 + 8 * 4 + 4 + 5,
        # 5 numeric, 3 booleans, (12+1) + (4+1) + (3+1) + (12+1) + (4+1) categories, age used as feature
        "bank_propensity": 5 + 3 + 13 + 5 + 4 + 13 + 5 + 1,
    }
    for name, n in expected.items():
        enc = FeatureEncoder(load_schema(SCHEMAS / f"{name}.yaml"))
        assert enc.n_features == n, name
        assert len(set(enc.feature_names)) == n, name  # names identify features uniquely


@pytest.mark.skipif(not TELCO.exists(), reason=f"the public Telco table is not at {TELCO}")
def test_telco_encodes_in_unit_interval_with_the_blank_charges_flagged() -> None:
    schema = load_schema(SCHEMAS / "telco_churn.yaml")
    t = load_table(TELCO, schema)
    enc = FeatureEncoder(schema)
    x = enc.encode(t)
    assert x.shape == (7043, enc.n_features)
    assert x.min() >= 0.0 and x.max() <= 1.0
    flag = x[:, enc.feature_names.index("TotalCharges: missing")]
    assert flag.sum() == 11
    assert (x[flag == 1, enc.feature_names.index("TotalCharges")] == 0).all()
