"""Parsing and checking text columns as the schema declares: the one validation of every table.

Every problem is a :class:`DataError` naming the file, the line, the column, what was expected and
what was found; what the schema's policy repairs is counted in the :class:`ValidationReport`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedcrm.data.reading import TextChunk
from fedcrm.data.schema import BooleanColumn, CategoricalColumn, Column, NumericColumn, Schema
from fedcrm.data.table import MISSING, OTHER, CustomerTable, ValidationReport, error_at, lines_text
from fedcrm.errors import DataError

# The characters Python's ``str.strip()`` removes (``str.isspace``), so Arrow trims exactly as it did.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def stripped(cells: pa.Array) -> pa.Array:
    """The cells without surrounding whitespace, as ``str.strip()`` would leave them."""
    return pc.utf8_trim(cells, characters=_WHITESPACE)


class _Cells:
    """A column's cells, stripped, with the checks the parsers ask of them.

    A column of few distinct values (categories, booleans, labels, consent) is dictionary-encoded
    first, so trimming and matching run on its handful of distinct values, not on every row.
    """

    def __init__(self, raw: pa.Array, *, few_distinct: bool) -> None:
        self.index: np.ndarray | None = None
        if few_distinct:
            encoded = pc.dictionary_encode(raw)
            raw = encoded.dictionary
            self.index = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
        self.text = stripped(raw)

    def _per_row(self, per_text: np.ndarray) -> np.ndarray:
        return per_text if self.index is None else per_text[self.index]

    def among(self, spellings: tuple[str, ...]) -> np.ndarray:
        """Whether each cell is one of ``spellings`` (exactly, as written)."""
        found = pc.is_in(self.text, value_set=pa.array(spellings, type=pa.string()))
        return self._per_row(np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool))

    def position_in(self, vocabulary: tuple[str, ...]) -> np.ndarray:
        """Each cell's position in ``vocabulary``, -1 where it is not there."""
        at = pc.fill_null(pc.index_in(self.text, value_set=pa.array(vocabulary, type=pa.string())), -1)
        return self._per_row(np.asarray(at.to_numpy(zero_copy_only=False)))

    def first(self, mask: np.ndarray) -> str:
        """The first cell where ``mask`` holds, stripped (for an error message)."""
        row = int(np.flatnonzero(mask)[0])
        return str(self.text[row if self.index is None else int(self.index[row])].as_py())

    def counted(self, mask: np.ndarray) -> dict[str, int]:
        """How often each text occurs where ``mask`` holds, in the order the rows first show it."""
        if self.index is None:
            return dict(Counter(self.text.filter(pa.array(mask)).to_pylist()))
        per_text = np.bincount(self.index[mask], minlength=len(self.text))  # dictionary: in order of appearance
        out: dict[str, int] = {}
        for text, n in zip(self.text.to_pylist(), per_text.tolist(), strict=True):
            if n:
                out[text] = out.get(text, 0) + n
        return out


def _parse_column(
    raw: pa.Array, col: Column, *, lines: np.ndarray, path: Path, report: ValidationReport, decimal: str = "."
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one column; returns the values and a mask of rows to drop (missing, policy ``drop``).

    Numbers as float64 (NaN where an indicated value is missing), booleans as 0/1 float64,
    categoricals as an object array of the vocabulary's own strings (unknowns as ``(other)``).
    """
    cells = _Cells(raw, few_distinct=not isinstance(col, NumericColumn))
    missing = cells.among(col.missing_spellings)
    issues = report.issues(col.name)
    drop = np.zeros(len(raw), dtype=bool)
    if missing.any():
        if col.missing == "error":
            raise error_at(
                path,
                lines[missing],
                col.name,
                f"expected a value, found an empty cell ({cells.first(missing)!r}); declare a "
                "`missing` policy in the schema (drop, fill or indicator) if blanks are expected",
            )
        if col.missing == "drop":
            drop = missing
            issues.rows_dropped_missing += int(missing.sum())
        elif col.missing == "fill":
            issues.missing_filled += int(missing.sum())
        else:
            issues.missing_indicated += int(missing.sum())

    if isinstance(col, NumericColumn):
        text = _decimal_point(cells.text, decimal=decimal)
        num = _numbers(pc.if_else(pa.array(missing), "nan", text) if missing.any() else text)
        bad = np.isnan(num) & ~missing | np.isinf(num)
        if bad.any():
            found = cells.first(bad)
            raise error_at(
                path, lines[bad], col.name, f"expected a number, found {found!r}{_decimal_hint(found, decimal)}"
            )
        if col.missing == "fill":
            num = np.where(missing, float(col.fill or 0.0), num)  # a `fill` policy always has its value
        low, high = num < col.min, num > col.max
        issues.clipped_low += int(low.sum())
        issues.clipped_high += int(high.sum())
        return np.clip(num, col.min, col.max), drop

    if isinstance(col, BooleanColumn):
        t = cells.among(col.true_values)
        f = cells.among(col.false_values)
        bad = ~(t | f | missing)
        if bad.any():
            raise error_at(
                path,
                lines[bad],
                col.name,
                f"expected one of {list(col.true_values + col.false_values)}, found {cells.first(bad)!r}",
            )
        out = np.where(t, 1.0, 0.0)
        out[missing] = np.nan if col.missing != "fill" else float(bool(col.fill))
        return out, drop

    assert isinstance(col, CategoricalColumn)
    codes = cells.position_in(col.vocabulary)
    unknown = (codes < 0) & ~missing
    if unknown.any():
        if col.unknown == "error":
            raise error_at(
                path,
                lines[unknown],
                col.name,
                f"expected one of {list(col.vocabulary)}, found {cells.first(unknown)!r}",
            )
        issues.unknown_categories.update(cells.counted(unknown))
    # Every cell becomes one of these few strings, shared, not a string of its own per row.
    names = np.asarray([*col.vocabulary, OTHER, col.fill if col.missing == "fill" else MISSING], dtype=object)
    codes = np.where(codes < 0, len(col.vocabulary), codes)
    codes[missing] = len(col.vocabulary) + 1
    return names[codes], drop


_DECIMAL_COMMA = re.compile(r"\s*[+-]?\d*,\d+\s*")


def _decimal_point(text: pa.Array, *, decimal: str) -> pa.Array:
    """The cells with "." as their decimal point. With ``decimal: ","`` a cell holding a "." is made
    unreadable, never read: in such a file "1.234" is a thousands separator's 1234, not 1.234."""
    if decimal == ".":
        return text
    text = pc.if_else(pc.match_substring(text, "."), "not a number", text)
    return pc.replace_substring(text, ",", ".")


def _decimal_hint(found: str, decimal: str) -> str:
    """What to declare when a cell fails because the schema expects another decimal mark."""
    if decimal == "." and _DECIMAL_COMMA.fullmatch(found):
        return ' (a decimal comma? if the table writes numbers as `29,85`, declare `decimal: ","` in the schema)'
    if decimal == "," and "." in found:
        return ' (the schema declares `decimal: ","`: a "." is neither a decimal point nor a thousands mark here)'
    return ""


def _numbers(text: pa.Array) -> np.ndarray:
    """Text cells as floats, NaN where a cell is not a number (the caller reports those).

    Arrow's parser first: about 10x faster than pandas' on a million cells. It refuses the whole
    column at the first bad cell, and then pandas finds every bad one.
    """
    try:
        return np.asarray(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return np.asarray(
            pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False), dtype=object), errors="coerce").to_numpy(
                dtype=float
            )
        )


def _blank_is_a_band(col: Column) -> Column:
    """A banded attribute kept for fairness only: its blanks are the ``(missing)`` band, never an error.

    An error would answer "does any customer lack this attribute?" before anything is charged; the
    band is counted in the DP answer like any other (fairness declares it for every banded attribute).
    """
    return col.model_copy(update={"missing": "indicator"}) if col.missing == "error" else col


def _band(values: np.ndarray, bands: tuple[float, ...]) -> np.ndarray:
    edges = list(bands)
    labels = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f">={edges[-1]:g}")
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    banded = np.asarray(labels, dtype=object)[idx]
    banded[np.isnan(values)] = MISSING  # searchsorted would put NaN in the top band
    return banded


class SeenIds:
    """Customer ids already read (from earlier chunks too), as sorted 64-bit hashes with their lines.

    8 + 8 bytes a row instead of the ids themselves. The hash is Python's own string hash (SipHash,
    keyed per process, which is all a check within one read needs): 5x faster than pandas' hashing of
    object arrays. Two different ids share a hash with probability about n² / 2⁶⁵ (3e-8 for a million
    customers): within a chunk the ids are then compared exactly; across chunks it would be reported as
    a duplicate.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hashes = np.empty(0, dtype=np.int64)
        self.lines = np.empty(0, dtype=np.int64)

    def add(self, ids: np.ndarray, lines: np.ndarray, *, column: str | None) -> None:
        """Record the ids of one chunk; raises :class:`DataError` for an id seen twice (first in the chunk)."""
        h = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(h, kind="stable")
        h = h[order]
        if (h[1:] == h[:-1]).any():
            _check_unique(ids, lines=lines, path=self.path, column=column)  # exact; a mere hash collision passes
        place = np.searchsorted(self.hashes, h)  # once: for the check against earlier chunks and for the merge
        if len(self.hashes):
            at = np.minimum(place, len(self.hashes) - 1)
            again = self.hashes[at] == h
            if again.any():
                first = int(order[again].min())  # the duplicate that comes first in this chunk
                k = int(np.flatnonzero(order == first)[0])
                same = np.array([self.lines[at[k]], lines[first]])
                raise DataError(
                    f"customer id {ids[first]!r} appears more than once ({lines_text(same)}); ids must be unique",
                    path=str(self.path),
                    line=int(same[0]),
                    column=column,
                )
        # One merge of two sorted runs, no temporary sort of the whole.
        self.hashes = np.insert(self.hashes, place, h)
        self.lines = np.insert(self.lines, place, lines[order])


def _two_valued(
    column_text: Any,
    yes: tuple[str, ...],
    no: tuple[str, ...],
    *,
    path: Path,
    lines: np.ndarray,
    column: str,
    expected: str,
) -> np.ndarray:
    """Which cells of a yes/no column (the label, a consent) say yes; any other value is an error at its row."""
    cells = _Cells(column_text, few_distinct=True)
    says_yes = cells.among(yes)
    bad = ~(says_yes | cells.among(no))
    if bad.any():
        raise error_at(path, lines[bad], column, f"{expected} {list(yes + no)}, found {cells.first(bad)!r}")
    return says_yes


def validate(
    raw: TextChunk, *, schema: Schema, path: Path, report: ValidationReport, seen: SeenIds | None = None
) -> CustomerTable:
    """Parse and check the text columns ``raw`` (one table, or one chunk of one); adds to ``report``.

    Works on Arrow's text arrays throughout (trim, membership, number parsing are vectorised): a
    Python string is made only for an id, and an error's message.
    """
    n = len(raw)
    report.rows_read += n
    lines = raw.lines

    id_column = schema.id.column or (schema.id.derived_column if schema.id.derived_column in raw else None)
    if id_column:
        id_text = stripped(raw[id_column])
        blank = np.asarray(pc.equal(id_text, "").to_numpy(zero_copy_only=False), dtype=bool)
        if blank.any():
            raise error_at(path, lines[blank], id_column, "expected a customer id, found an empty cell")
        ids = np.asarray(id_text.to_numpy(zero_copy_only=False), dtype=object)
    else:
        ids = np.asarray([f"{schema.id.prefix}{ln:06d}" for ln in lines], dtype=object)
    (seen or SeenIds(path)).add(ids, lines, column=id_column)

    lab = schema.label
    pos = _two_valued(
        raw[lab.column],
        lab.positive,
        lab.negative,
        path=path,
        lines=lines,
        column=lab.column,
        expected="expected a label value among",
    )

    drop = np.zeros(n, dtype=bool)

    def parse(col: Any) -> np.ndarray:
        nonlocal drop
        parsed, d = _parse_column(raw[col.name], col, lines=lines, path=path, report=report, decimal=schema.decimal)
        drop |= d
        if d.any():
            report.rows_dropped[f"missing {col.name}"] += int(d.sum())
        return parsed

    values: dict[str, np.ndarray] = {col.name: parse(col) for col in schema.model_columns}
    sensitive: dict[str, Any] = {}
    for s in schema.sensitive:
        parsed = values.get(s.column.name)
        if parsed is None:
            parsed = parse(_blank_is_a_band(s.column) if s.bands else s.column)
        sensitive[s.column.name] = _band(parsed.astype(float), s.bands) if s.bands else parsed
    consent: dict[str, np.ndarray] = {
        c.purpose: _two_valued(
            raw[c.column],
            c.granted,
            c.refused,
            path=path,
            lines=lines,
            column=c.column,
            expected="consent must be one of",
        )
        for c in schema.consent
    }

    keep = ~drop
    report.rows_kept += int(keep.sum())
    table = CustomerTable(
        schema=schema,
        ids=ids,
        labels=pos.astype(np.int64),
        values=_frame(values, n=n),
        sensitive=_frame(sensitive, n=n),
        consent=_frame(consent, n=n),
        lines=lines,
        report=report,
    )
    return table if keep.all() else table.subset(keep)


def _frame(columns: dict[str, np.ndarray], *, n: int) -> pd.DataFrame:
    """Parsed columns as a frame; text stays in object arrays (pandas would copy it into Arrow strings)."""
    return pd.DataFrame({k: pd.Series(v, dtype=v.dtype) for k, v in columns.items()}, index=range(n))


def _check_unique(ids: np.ndarray, *, lines: np.ndarray, path: Path, column: str | None) -> None:
    dup = pd.Series(ids, dtype=object).duplicated(keep=False).to_numpy()
    if dup.any():
        first = ids[dup][0]
        same = lines[ids == first]
        raise DataError(
            f"customer id {first!r} appears {len(same)} times ({lines_text(same)}); "
            f"ids must be unique ({int(dup.sum())} rows share an id)",
            path=str(path),
            line=int(same[0]),
            column=column,
        )
