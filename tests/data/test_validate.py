"""The Arrow-based parsing trims and matches cells exactly as Python's ``str.strip()`` and ``==`` would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from fedcrm.data.io import iter_table, load_table
from fedcrm.data.schema import Schema
from fedcrm.data.validate import stripped

SCHEMA = Schema.model_validate(
    {
        "name": "tiny",
        "delimiter": ",",
        "id": {"column": "cid"},
        "purposes": ["churn"],
        "label": {"column": "churn", "positive": ["yes"], "negative": ["no"]},
        "features": [
            {"name": "age", "type": "numeric", "min": 18, "max": 90},
            {"name": "plan", "type": "categorical", "vocabulary": ["basic", "pro"]},
        ],
    }
)


def test_cells_are_trimmed_of_every_character_python_calls_whitespace() -> None:
    every_space = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    cells = [f"{every_space}a b{every_space}", "\u3000pro\x1c", "\x85", "", "plain"]
    assert stripped(pa.array(cells)).to_pylist() == [c.strip() for c in cells]


def test_a_table_with_unicode_padding_loads_as_its_stripped_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("cid,churn,age,plan\n\u2003c1 ,yes\x1f,\xa030,pro\u3000\nc2,no,40,basic\n", encoding="utf-8")
    for table in (load_table(path, SCHEMA), next(iter_table(path, SCHEMA))):
        assert table.ids.tolist() == ["c1", "c2"]
        assert table.labels.tolist() == [1, 0]
        np.testing.assert_array_equal(table.values["age"].to_numpy(), [30.0, 40.0])
        assert table.values["plan"].tolist() == ["pro", "basic"]
