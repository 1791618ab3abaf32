"""A European spreadsheet's export (``;`` between fields, ``29,85`` for a number) loads with the schema
option ``decimal: ","``; without it the validation error names the option. The option decides how a row
is read, so a run's schema must carry the data owner's (fedcrm.data.schema_match).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, write_tiny_config

from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.schema_match import schema_differences
from fedcrm.errors import DataError

NUMERIC = ("tenure_months", "monthly_spend", "support_tickets")


def _european(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny region's table as a European spreadsheet writes it, and the original."""
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    original = Path(cfg.regions["eu"])
    with original.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = tmp_path / "eu-excel.csv"
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        w.writeheader()
        w.writerows({k: v.replace(".", ",") if k in NUMERIC else v for k, v in row.items()} for row in rows)
    return out, original


def _schema(tmp_path: Path, **changes: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "schemas" / "synthetic_crm.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_decimal_comma_table_loads_as_the_same_numbers(tmp_path: Path) -> None:
    european, original = _european(tmp_path)
    assert "," in european.read_text().splitlines()[1].split(";")[2]  # a spend such as 212,80
    schema = load_schema(_schema(tmp_path, decimal=","))
    read = load_table(european, schema)
    expected = load_table(original, load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml"))
    for column in NUMERIC:
        assert np.array_equal(read.values[column].to_numpy(), expected.values[column].to_numpy(), equal_nan=True)


def test_a_decimal_comma_without_the_option_is_refused_with_a_hint(tmp_path: Path) -> None:
    european, _ = _european(tmp_path)
    with pytest.raises(DataError, match=r'declare `decimal: ","` in the schema'):
        load_table(european, load_schema(_schema(tmp_path, delimiter=";")))


def test_a_point_under_a_decimal_comma_is_refused_not_read_as_a_thousands_separator(tmp_path: Path) -> None:
    _, original = _european(tmp_path)  # points as decimal marks, "," between fields
    with pytest.raises(DataError, match="expected a number"):
        load_table(original, load_schema(_schema(tmp_path, decimal=",")))


def test_the_decimal_mark_is_the_data_owners(tmp_path: Path) -> None:
    owner = load_schema(_schema(tmp_path, decimal=","))
    run = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
    assert any(d.startswith("`decimal`") for d in schema_differences(run, owner=owner))
    assert schema_differences(owner, owner=owner) == []
