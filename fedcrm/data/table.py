"""A validated customer table and its validation report: what :mod:`fedcrm.data.io` hands out.

Also how a problem found in it is worded: the file, the line an editor shows (the header is line 1),
the column, what was expected and what was found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcrm.data.schema import Schema
from fedcrm.errors import DataError

OTHER = "(other)"
MISSING = "(missing)"
_MAX_LINES_LISTED = 5


@dataclass
class ColumnIssues:
    """What was repaired in one column by the declared policy (counted, not fatal)."""

    clipped_low: int = 0
    clipped_high: int = 0
    unknown_categories: Counter[str] = field(default_factory=Counter)
    missing_filled: int = 0
    missing_indicated: int = 0
    rows_dropped_missing: int = 0

    def any(self) -> bool:
        return bool(
            self.clipped_low
            or self.clipped_high
            or self.unknown_categories
            or self.missing_filled
            or self.missing_indicated
            or self.rows_dropped_missing
        )

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "clipped_low": self.clipped_low,
            "clipped_high": self.clipped_high,
            "unknown_categories": dict(self.unknown_categories),
            "missing_filled": self.missing_filled,
            "missing_indicated": self.missing_indicated,
            "rows_dropped_missing": self.rows_dropped_missing,
        }
        return {k: v for k, v in d.items() if v}


@dataclass
class ValidationReport:
    path: str
    delimiter: str | None = None  # the CSV delimiter the file was read with (None: Parquet)
    delimiter_from: str | None = None  # who said so: "region" (its config), "schema" or "detected"
    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped: Counter[str] = field(default_factory=Counter)
    columns: dict[str, ColumnIssues] = field(default_factory=dict)

    def issues(self, column: str) -> ColumnIssues:
        return self.columns.setdefault(column, ColumnIssues())

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "delimiter": self.delimiter,
            "delimiter_from": self.delimiter_from,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": dict(self.rows_dropped),
            "columns": {k: v.as_dict() for k, v in self.columns.items() if v.any()},
        }


@dataclass
class CustomerTable:
    """A validated table: one row per customer, values parsed and repaired as the schema declares.

    ``values`` holds the model columns (numeric as float with NaN for an indicated missing value,
    booleans as 0/1 float, categoricals as text with unknowns mapped to ``(other)``); ``sensitive``
    the protected attributes (numeric ones in bands); ``consent`` one boolean column per purpose.
    """

    schema: Schema
    ids: np.ndarray
    labels: np.ndarray
    values: pd.DataFrame
    sensitive: pd.DataFrame
    consent: pd.DataFrame
    lines: np.ndarray
    report: ValidationReport

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray) -> CustomerTable:
        """The rows where ``mask`` is true (same schema, same report); the table itself when all are."""
        if mask.all():
            return self  # the usual case when scoring (nobody forgotten in this chunk): no copy of every column
        idx = np.flatnonzero(mask)
        return CustomerTable(
            schema=self.schema,
            ids=self.ids[idx],
            labels=self.labels[idx],
            values=self.values.iloc[idx].reset_index(drop=True),
            sensitive=self.sensitive.iloc[idx].reset_index(drop=True),
            consent=self.consent.iloc[idx].reset_index(drop=True),
            lines=self.lines[idx],
            report=self.report,
        )


def lines_text(lines: np.ndarray) -> str:
    shown = ", ".join(str(int(n)) for n in lines[:_MAX_LINES_LISTED])
    more = f" and {len(lines) - _MAX_LINES_LISTED} more" if len(lines) > _MAX_LINES_LISTED else ""
    return f"line {shown}{more}" if len(lines) == 1 else f"lines {shown}{more}"


def error_at(path: Path, lines: np.ndarray, column: str, message: str) -> DataError:
    extra = f" (also {lines_text(lines[1:])})" if len(lines) > 1 else ""
    return DataError(f"{message}{extra}", path=str(path), line=int(lines[0]), column=column)
