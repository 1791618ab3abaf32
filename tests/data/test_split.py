"""Splitting one table into regions: reproducible to the byte, disjoint and complete, each method doing
what it says, derived ids surviving the split, and the manifest agreeing with the files it lists.

Region files are read back with pandas here, not with fedcrm's loader, where the check is about the
files themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcrm.data.io import load_table
from fedcrm.data.schema import Schema, load_schema
from fedcrm.data.split import SplitMethod, hash_buckets, split_table, stable_hash
from fedcrm.data.synthetic import generate
from fedcrm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "configs" / "schemas"
BANK = ROOT.parent / "shared" / "data" / "bank_marketing_full.csv"
REGIONS = ["eu", "us", "apac"]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema(SCHEMAS / "synthetic_crm.yaml")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic table of 3,000 customers (with its export defects) to split."""
    out = tmp_path_factory.mktemp("source")
    generate(regions=["all"], customers=3000, seed=21, out_dir=out)
    return out / "all.csv"


def split(
    schema: Schema, source: Path, out: Path, *, by: str = "hash", seed: int = 0, regions: list[str] | None = None
) -> dict:
    return split_table(
        schema=schema,
        input_path=source,
        regions=regions or REGIONS,
        method=SplitMethod.parse(by),
        seed=seed,
        out_dir=out,
    )


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)


def test_stable_hash_is_a_fixed_function_of_value_and_key() -> None:
    # Pinned: a change here would silently move customers between regions on every machine.
    assert stable_hash("c1", key="k") == stable_hash("c1", key="k")
    assert stable_hash("c1", key="k") != stable_hash("c1", key="k2")
    b = hash_buckets(np.array([f"c{i}" for i in range(3000)]), buckets=3, key="x")
    assert set(b) == {0, 1, 2} and abs(np.bincount(b) - 1000).max() < 150


@pytest.mark.parametrize("by", ["hash", "dirichlet:0.5", "column:channel"])
def test_same_seed_gives_byte_identical_files(schema: Schema, source: Path, tmp_path: Path, by: str) -> None:
    regions = ["web", "store", "phone", "partner"] if by.startswith("column") else REGIONS
    split(schema, source, tmp_path / "a", by=by, seed=5, regions=regions)
    split(schema, source, tmp_path / "b", by=by, seed=5, regions=regions)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([*(f"{r}.csv" for r in regions), "manifest.json"])
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


@pytest.mark.parametrize("by", ["hash", "dirichlet:0.5"])
def test_another_seed_gives_another_split(schema: Schema, source: Path, tmp_path: Path, by: str) -> None:
    split(schema, source, tmp_path / "a", by=by, seed=5)
    split(schema, source, tmp_path / "b", by=by, seed=6)
    for r in REGIONS:
        assert set(read(tmp_path / "a", r)["customer_id"]) != set(read(tmp_path / "b", r)["customer_id"]), r


@pytest.mark.parametrize("by", ["hash", "dirichlet:0.3", "column:contract"])
def test_regions_are_disjoint_and_complete_and_rows_are_copied_unchanged(
    schema: Schema, source: Path, tmp_path: Path, by: str
) -> None:
    regions = ["month-to-month", "one-year", "two-year"] if by.startswith("column") else REGIONS
    split(schema, source, tmp_path, by=by, seed=1, regions=regions)
    original = pd.read_csv(source, dtype=str, keep_default_na=False).set_index("customer_id")
    seen: list[str] = []
    for r in regions:
        part = read(tmp_path, r)
        seen += list(part["customer_id"])
        # Every row is the input row, column for column (defects included).
        pd.testing.assert_frame_equal(part.set_index("customer_id"), original.loc[part["customer_id"]])
    assert len(seen) == len(set(seen))
    assert set(seen) == set(original.index)


def test_column_split_puts_each_customer_in_the_region_its_column_names(
    schema: Schema, source: Path, tmp_path: Path
) -> None:
    regions = ["web", "store", "phone", "partner"]
    split(schema, source, tmp_path, by="column:channel", regions=regions)
    for r in regions:
        assert set(read(tmp_path, r)["channel"]) == {r}


def test_column_split_refuses_values_that_are_not_regions(schema: Schema, source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected every value .* found \['partner'"):
        split(schema, source, tmp_path, by="column:channel", regions=["web", "store", "phone"])
    with pytest.raises(DataError, match="expected a column 'nope' to split by"):
        split(schema, source, tmp_path, by="column:nope")
    assert not tmp_path.joinpath("web.csv").exists()  # nothing written on error


def test_dirichlet_skews_labels_more_than_hash(schema: Schema, source: Path, tmp_path: Path) -> None:
    def spread(manifest: dict) -> float:
        rates = [r["label_rate"] for r in manifest["regions"].values()]
        return max(rates) - min(rates)

    hashed = split(schema, source, tmp_path / "h", by="hash", seed=2)
    skewed = [split(schema, source, tmp_path / f"d{s}", by="dirichlet:0.3", seed=s) for s in range(3)]
    assert spread(hashed) < 0.05
    assert all(spread(m) > 0.15 for m in skewed), [spread(m) for m in skewed]


def test_manifest_numbers_match_the_files(schema: Schema, source: Path, tmp_path: Path) -> None:
    manifest = split(schema, source, tmp_path, by="dirichlet:1.0", seed=3)
    stored = json.loads((tmp_path / "manifest.json").read_text())
    assert stored == manifest
    assert (stored["schema"], stored["by"], stored["seed"], stored["alpha"]) == ("synthetic_crm", "dirichlet", 3, 1.0)
    for r in REGIONS:
        part = read(tmp_path, r)
        assert stored["regions"][r]["file"] == f"{r}.csv"
        assert stored["regions"][r]["rows"] == len(part)
        assert stored["regions"][r]["label_rate"] == pytest.approx((part["churned"] == "1").mean(), abs=1e-4)


def test_region_files_load_with_the_same_schema(schema: Schema, source: Path, tmp_path: Path) -> None:
    split(schema, source, tmp_path, seed=4)
    whole = load_table(source, schema)
    total = sum(len(load_table(tmp_path / f"{r}.csv", schema)) for r in REGIONS)
    assert total == len(whole) == 3000


def test_rows_dropped_by_the_schema_are_not_written(tmp_path: Path) -> None:
    text = (SCHEMAS / "synthetic_crm.yaml").read_text()
    strict = text.replace("missing: indicator", "missing: drop")
    strict_path = tmp_path / "strict.yaml"
    strict_path.write_text(strict)
    s = load_schema(strict_path)
    generate(regions=["all"], customers=2000, seed=8, out_dir=tmp_path / "src")
    src = tmp_path / "src" / "all.csv"
    blank = int((pd.read_csv(src, dtype=str, keep_default_na=False)["monthly_spend"] == "").sum())
    assert blank > 0
    manifest = split(s, src, tmp_path / "out", seed=0)
    assert sum(r["rows"] for r in manifest["regions"].values()) == 2000 - blank


def test_bad_arguments_are_config_errors(schema: Schema, source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distinct"):
        split(schema, source, tmp_path, regions=["eu", "eu"])
    with pytest.raises(ConfigError, match="region name"):
        split(schema, source, tmp_path, regions=["eu", "../us"])
    for bad in ("dirichlet:0", "dirichlet:x", "random", "column:"):
        with pytest.raises(ConfigError, match="--by"):
            SplitMethod.parse(bad)


def test_too_many_regions_for_the_rows_is_refused_before_writing(tmp_path: Path, schema: Schema) -> None:
    generate(regions=["tiny"], customers=3, seed=0, out_dir=tmp_path / "src")
    with pytest.raises(DataError, match="would get no customers"):
        split(schema, tmp_path / "src" / "tiny.csv", tmp_path / "out", regions=[f"r{i}" for i in range(6)])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not BANK.exists(), reason=f"the public Bank Marketing table is not at {BANK}")
def test_bank_customers_keep_their_derived_ids_after_a_split(tmp_path: Path) -> None:
    bank = load_schema(SCHEMAS / "bank_propensity.yaml")
    split(bank, BANK, tmp_path, seed=0)
    original = pd.read_csv(BANK, sep=";", dtype=str, keep_default_na=False)
    ids: list[str] = []
    for r in REGIONS:
        part = pd.read_csv(tmp_path / f"{r}.csv", sep=";", dtype=str, keep_default_na=False)
        # The id column holds each customer's id from the whole table (line 2 = bank-000002) ...
        rows = part["customer_id"].str.removeprefix("bank-").astype(int) - 2
        pd.testing.assert_frame_equal(
            part.drop(columns="customer_id").reset_index(drop=True),
            original.iloc[rows.to_numpy()].reset_index(drop=True),
        )
        # ... and the loader uses it instead of re-deriving one from the region file's own lines.
        region = load_table(tmp_path / f"{r}.csv", bank)
        assert list(region.ids) == list(part["customer_id"])
        ids += list(region.ids)
    assert sorted(ids) == [f"bank-{line:06d}" for line in range(2, 45_211 + 2)]
