"""Loading a customer table through its declared schema: the one validated way data enters fedcrm.

Values are read as text and parsed here, so every problem can be reported with the file, the line as
an editor shows it (the header is line 1), the column, what was expected and what was found.
Columns the schema does not name are never read (data minimisation).
"""

from __future__ import annotations

import csv
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd

from fedcrm.data.schema import (
    BooleanColumn,
    CategoricalColumn,
    Column,
    NumericColumn,
    Schema,
)
from fedcrm.errors import DataError

OTHER = "(other)"
MISSING = "(missing)"
_MAX_LINES_LISTED = 5
T = TypeVar("T")


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
        """The rows where ``mask`` is true (same schema, same report)."""
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


def _lines_text(lines: np.ndarray) -> str:
    shown = ", ".join(str(int(n)) for n in lines[:_MAX_LINES_LISTED])
    more = f" and {len(lines) - _MAX_LINES_LISTED} more" if len(lines) > _MAX_LINES_LISTED else ""
    return f"line {shown}{more}" if len(lines) == 1 else f"lines {shown}{more}"


def _fail(path: Path, lines: np.ndarray, column: str, message: str) -> DataError:
    extra = f" (also {_lines_text(lines[1:])})" if len(lines) > 1 else ""
    return DataError(f"{message}{extra}", path=str(path), line=int(lines[0]), column=column)


_DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 64 * 1024


def _first_line(text: str) -> str:
    """The first non-blank line of ``text`` (the header of a CSV)."""
    return next((ln for ln in text.splitlines() if ln.strip()), "")


def _split_header(line: str, delimiter: str) -> list[str]:
    return [h.strip() for h in next(csv.reader([line], delimiter=delimiter), [])]


def csv_delimiter(path: Path, schema: Schema, *, given: str | None = None) -> str:
    """The delimiter of this file; see :func:`delimiter_and_source`."""
    return delimiter_and_source(path, schema, given=given)[0]


def delimiter_and_source(path: Path, schema: Schema, *, given: str | None = None) -> tuple[str, str]:
    """The delimiter of this file and who said so: the region's, else the schema's, else detected.

    The delimiter belongs to the file, not to the schema: the same Telco table exported by a European
    spreadsheet uses `;`. A region may say so (``regions: {eu: {path: ..., delimiter: ";"}}`` or its
    node config's ``delimiter``); then that one is used, never second-guessed. Otherwise the schema's
    delimiter is a default, kept whenever the header names all the schema's columns under it.
    """
    if given:
        return given, "region"
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        header_line = _first_line(f.read(_SNIFF_BYTES))
    if schema.delimiter and set(schema.columns_read()) <= set(_split_header(header_line, schema.delimiter)):
        return schema.delimiter, "schema"
    return _detect_delimiter(header_line, schema), "detected"


def _detect_delimiter(header_line: str, schema: Schema) -> str:
    """The delimiter under which the header names most of the schema's columns (then: most fields).

    Looking for the declared column names is sturdier than a generic sniffer, which guesses from
    whatever characters happen to be frequent in the first rows.
    """
    wanted = set(schema.columns_read())

    def score(d: str) -> tuple[int, int, int]:
        fields = _split_header(header_line, d)
        return len(wanted & set(fields)), len(fields), -_DELIMITERS.index(d)

    return max(_DELIMITERS, key=score)


def _not_a_table(path: Path, what: str) -> DataError:
    return DataError(
        f"not a table: {what}; expected a CSV file (a header line, then one customer per line) or a Parquet file",
        path=str(path),
    )


def _sniff_kind(path: Path) -> str:
    """``parquet`` or ``csv`` from the file's bytes; other files are refused before any parsing."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    if path.suffix.lower() in (".parquet", ".pq"):
        raise _not_a_table(path, "the name says Parquet but the file does not start with Parquet's `PAR1` marker")
    if b"\x00" in head:
        raise _not_a_table(path, "the file holds binary bytes (NUL), not text")
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if not text:
        raise DataError("the file is empty: expected a header line and customer rows", path=str(path))
    if text[0] in "{[":
        raise _not_a_table(path, f"it looks like JSON (it starts with {text[0]!r})")
    return "csv"


def _read_parquet(path: Path, schema: Schema, *, all_columns: bool) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a broken Parquet file
        raise _not_a_table(path, f"Parquet could not read it ({e})") from None
    _check_columns(path, schema, names)
    wanted = names if all_columns else _wanted(schema, names)
    return _parquet_text(pq.read_table(path, columns=wanted).to_pandas(), first_row=0)


def _parquet_text(frame: pd.DataFrame, *, first_row: int) -> pd.DataFrame:
    """Parquet values as the text a CSV of the same table would hold (the parsers read text)."""
    out = frame.astype(object).where(frame.notna(), "")
    out = out.map(lambda v: v if isinstance(v, str) else _num_text(v))
    # Parquet has no lines; rows are numbered as the same table written as CSV would be (header = 1).
    out.attrs["lines"] = np.arange(first_row + 2, first_row + len(out) + 2)
    return out


def _parquet_chunks(path: Path, schema: Schema, *, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken Parquet file
        raise _not_a_table(path, f"Parquet could not read it ({e})") from None
    names = file.schema_arrow.names
    _check_columns(path, schema, names)
    done = 0
    for batch in file.iter_batches(batch_size=chunk_rows, columns=_wanted(schema, names)):
        yield _parquet_text(batch.to_pandas(), first_row=done)
        done += batch.num_rows
    if done == 0:
        yield _parquet_text(file.schema_arrow.empty_table().select(_wanted(schema, names)).to_pandas(), first_row=0)


def _wanted(schema: Schema, header: list[str]) -> list[str]:
    wanted = schema.columns_read()
    if schema.id.derive and schema.id.derived_column in header:
        wanted.append(schema.id.derived_column)
    return wanted


def _not_utf8(path: Path) -> DataError:
    """Where the first byte that is not UTF-8 sits (the text reader decodes in chunks, so find it here)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return DataError(f"expected UTF-8 text, found byte 0x{data[e.start]:02x} that is not UTF-8 (save the "
                         "table as UTF-8)", path=str(path), line=line)
    return DataError("expected UTF-8 text", path=str(path))


def _picker(keep: list[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """A fast function taking the kept fields of a record, as a tuple (itemgetter of one is not one)."""
    if len(keep) == 1:
        only = keep[0]
        return lambda record: (record[only],)
    getter = operator.itemgetter(*keep)
    return lambda record: getter(record)  # type: ignore[no-any-return]


def _csv_chunks(
    path: Path, schema: Schema, *, all_columns: bool, chunk_rows: int | None, given_delimiter: str | None = None
) -> Iterator[pd.DataFrame]:
    """Parse the CSV with the standard library, keeping the line every record starts on.

    Blank lines are skipped and quoted cells may span lines, so line numbers are counted here rather
    than assumed to be ``row + 2``; every later error can then point at the line an editor shows.
    Yields frames of at most ``chunk_rows`` rows (all rows in one when None); a table with only a
    header yields one empty frame.
    """
    delimiter, source = delimiter_and_source(path, schema, given=given_delimiter)
    header: list[str] | None = None
    header_at = 1
    keep: list[int] = []
    width = 0
    pick: Callable[[list[str]], tuple[str, ...]] = tuple
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    start = 1
    yielded = False

    def frame() -> pd.DataFrame:
        assert header is not None
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(keep)
        out = pd.DataFrame({k: np.asarray(c, dtype=object) for k, c in enumerate(columns)},
                           index=range(len(rows)), dtype=object)
        out.columns = [header[i] for i in keep]
        out.attrs["lines"] = np.asarray(lines, dtype=np.int64)
        out.attrs["delimiter"], out.attrs["delimiter_from"] = delimiter, source
        return out

    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=False)
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # a blank line
                if header is None:
                    header = [h.strip() for h in record]
                    header_at = line
                    _check_columns(path, schema, header, line=line, delimiter=delimiter)
                    keep = (list(range(len(header))) if all_columns
                            else [header.index(c) for c in _wanted(schema, header)])
                    pick = _picker(keep)
                    width = len(header)
                    continue
                if len(record) != width:
                    raise DataError(
                        f"expected {len(header)} {delimiter!r}-separated fields as in the header (line "
                        f"{header_at}), found {len(record)} (a stray delimiter, an unclosed quote, or a "
                        "truncated line?)",
                        path=str(path), line=line,
                    )
                rows.append(pick(record))
                lines.append(line)
                if chunk_rows is not None and len(rows) >= chunk_rows:
                    yield frame()
                    yielded, rows, lines = True, [], []
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise DataError(f"not a readable {delimiter!r}-separated table: {e}", path=str(path), line=start) from None
    if header is None:
        raise DataError("the file is empty: expected a header line and customer rows", path=str(path))
    if rows or not yielded:
        yield frame()


def _read_csv(path: Path, schema: Schema, *, all_columns: bool, delimiter: str | None) -> pd.DataFrame:
    return next(_csv_chunks(path, schema, all_columns=all_columns, chunk_rows=None, given_delimiter=delimiter))


def read_raw(
    path: Path, schema: Schema, *, all_columns: bool = False, delimiter: str | None = None
) -> pd.DataFrame:
    """The schema's columns of the file, as text; nothing else is kept (data minimisation).

    A table whose schema derives ids may carry them in ``id.derived_column`` (written by a split).
    ``all_columns`` keeps every column (for :func:`fedcrm.data.split.split_table`, which copies rows
    as they are). ``frame.attrs["lines"]`` holds the line each row starts on (the header is line 1).
    ``delimiter``: the region's own for this file (else the schema's or detected; see
    :func:`delimiter_and_source`).
    """
    path = Path(path)
    if _table_kind(path) == "parquet":
        return _read_parquet(path, schema, all_columns=all_columns)
    return _read_csv(path, schema, all_columns=all_columns, delimiter=delimiter)


def _table_kind(path: Path) -> str:
    """``csv`` or ``parquet``, after refusing what is not a table file at all."""
    if not path.exists():
        raise DataError("file not found", path=str(path))
    if path.is_dir():
        raise _not_a_table(path, "it is a folder")
    if path.stat().st_size == 0:
        raise DataError("the file is empty: expected a header line and customer rows", path=str(path))
    return _sniff_kind(path)


def _num_text(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _check_columns(
    path: Path, schema: Schema, found: list[str], *, line: int | None = None, delimiter: str | None = None
) -> None:
    dupes = sorted({c for c in found if found.count(c) > 1 and c in schema.columns_read()})
    if dupes:
        raise DataError(f"the header names column {dupes[0]!r} twice; which one is meant is ambiguous",
                        path=str(path), line=line, column=dupes[0])
    missing = [c for c in schema.columns_read() if c not in found]
    if not missing:
        return
    if len(found) <= 1:
        how = f" with delimiter {delimiter!r}" if delimiter else ""
        raise DataError(
            f"does not look like a table of schema {schema.name}: expected a header with columns such as "
            f"{schema.columns_read()[:4]}, found {len(found)} field{'s' if len(found) != 1 else ''}{how}: "
            f"{[f[:40] for f in found[:4]]} (wrong file, or wrong delimiter?)",
            path=str(path), line=line,
        )
    raise DataError(
        f"expected column{'s' if len(missing) > 1 else ''} {missing} (required by schema {schema.name}), "
        f"found a header without {'them' if len(missing) > 1 else 'it'}: {found}",
        path=str(path), line=line if line is not None else 1, column=missing[0],
    )


def _parse_column(
    raw: pd.Series, col: Column, *, lines: np.ndarray, path: Path, report: ValidationReport
) -> tuple[pd.Series, np.ndarray]:
    """Parse one column; returns the values and a mask of rows to drop (missing, policy ``drop``)."""
    text = raw.astype(str).str.strip()
    missing = text.isin(col.missing_spellings).to_numpy()
    issues = report.issues(col.name)
    drop = np.zeros(len(text), dtype=bool)
    if missing.any():
        if col.missing == "error":
            raise _fail(path, lines[missing], col.name,
                        f"expected a value, found an empty cell ({text.to_numpy()[missing][0]!r}); declare a "
                        "`missing` policy in the schema (drop, fill or indicator) if blanks are expected")
        if col.missing == "drop":
            drop = missing
            issues.rows_dropped_missing += int(missing.sum())
        elif col.missing == "fill":
            issues.missing_filled += int(missing.sum())
        else:
            issues.missing_indicated += int(missing.sum())

    if isinstance(col, NumericColumn):
        num = _numbers(text.where(~missing, "nan"))
        bad = np.isnan(num) & ~missing | np.isinf(num)
        if bad.any():
            first = text.to_numpy()[bad][0]
            raise _fail(path, lines[bad], col.name, f"expected a number, found {first!r}")
        if col.missing == "fill":
            num[missing] = col.fill  # type: ignore[assignment]
        low, high = num < col.min, num > col.max
        issues.clipped_low += int(low.sum())
        issues.clipped_high += int(high.sum())
        return pd.Series(np.clip(num, col.min, col.max)), drop

    if isinstance(col, BooleanColumn):
        t = text.isin(col.true_values).to_numpy()
        f = text.isin(col.false_values).to_numpy()
        bad = ~(t | f | missing)
        if bad.any():
            first = text.to_numpy()[bad][0]
            raise _fail(path, lines[bad], col.name,
                        f"expected one of {list(col.true_values + col.false_values)}, found {first!r}")
        out = np.where(t, 1.0, 0.0)
        out[missing] = np.nan if col.missing != "fill" else float(bool(col.fill))
        return pd.Series(out), drop

    assert isinstance(col, CategoricalColumn)
    values = text.to_numpy(dtype=object)
    unknown = ~text.isin(col.vocabulary).to_numpy() & ~missing
    if unknown.any():
        if col.unknown == "error":
            raise _fail(path, lines[unknown], col.name,
                        f"expected one of {list(col.vocabulary)}, found {values[unknown][0]!r}")
        issues.unknown_categories.update(values[unknown].tolist())
        values[unknown] = OTHER
    values[missing] = col.fill if col.missing == "fill" else MISSING
    return pd.Series(values), drop


def _numbers(text: pd.Series) -> np.ndarray:
    """Text cells as floats, NaN where a cell is not a number (the caller reports those).

    Arrow's parser first: about 10x faster than pandas' on a million cells. It refuses the whole
    column at the first bad cell, and then pandas finds every bad one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.asarray(pc.cast(pa.array(text, type=pa.string()), pa.float64()).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return np.asarray(pd.to_numeric(text, errors="coerce").to_numpy(dtype=float))


def _band(values: np.ndarray, bands: tuple[float, ...]) -> np.ndarray:
    edges = list(bands)
    labels = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f">={edges[-1]:g}")
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    banded = np.asarray(labels, dtype=object)[idx]
    banded[np.isnan(values)] = MISSING  # searchsorted would put NaN in the top band
    return banded


def load_table(path: str | Path, schema: Schema, *, delimiter: str | None = None) -> CustomerTable:
    """Read and validate a customer table; raises :class:`DataError` naming file, line and column.

    ``delimiter``: the region's own for a CSV file (its config), used as given instead of the schema's.
    """
    path = Path(path)
    raw = read_raw(path, schema, delimiter=delimiter)
    if len(raw) == 0:
        raise _only_header(path)
    report = ValidationReport(path=str(path), delimiter=raw.attrs.get("delimiter"),
                              delimiter_from=raw.attrs.get("delimiter_from"))
    return _validate(raw, schema=schema, path=path, report=report)


DEFAULT_CHUNK_ROWS = 100_000


def iter_table(
    path: str | Path, schema: Schema, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, delimiter: str | None = None
) -> Iterator[CustomerTable]:
    """The table in validated chunks of about ``chunk_rows`` rows, for tables too large to hold at once.

    Same checks and errors as :func:`load_table` (ids unique across the whole file, by a 64-bit hash
    per row kept between chunks), with one report shared by the chunks and complete after the last.
    A plain CSV is read by Arrow's parser, several times faster than the line-counting one; its row
    numbers are only right when the file has no blank lines or cells over two lines, so on any
    problem the file is read again by :func:`load_table`, whose error names the right line.
    """
    path = Path(path)
    kind = _table_kind(path)
    report = ValidationReport(path=str(path))
    seen = _SeenIds(path)
    fast = kind == "csv" and _arrow_can_read(path, schema, delimiter=delimiter)
    if kind == "parquet":
        chunks = _parquet_chunks(path, schema, chunk_rows=chunk_rows)
    elif fast:
        chunks = _arrow_csv_chunks(path, schema, chunk_rows=chunk_rows, delimiter=delimiter)
    else:
        chunks = _csv_chunks(path, schema, all_columns=False, chunk_rows=chunk_rows, given_delimiter=delimiter)
    rows = 0
    try:
        for raw in chunks:
            report.delimiter, report.delimiter_from = raw.attrs.get("delimiter"), raw.attrs.get("delimiter_from")
            if len(raw) == 0:
                continue
            rows += len(raw)
            yield _validate(raw, schema=schema, path=path, report=report, seen=seen)
    except DataError:
        if fast:
            load_table(path, schema, delimiter=delimiter)  # raises the same problem with the line an editor shows
        raise
    if rows == 0:
        raise _only_header(path)


def table_from_frame(
    rows: pd.DataFrame, schema: Schema, *, source: str, model_columns_only: bool = False
) -> CustomerTable:
    """Validate rows held in a DataFrame (a notebook's) as a file with the same columns would be.

    ``model_columns_only``: only the id (else the row's position) and the model's columns are needed,
    for scoring rows whose label, consent and sensitive columns are not at hand.
    """
    if model_columns_only:
        schema = schema.model_copy(update={
            "sensitive": tuple(s for s in schema.sensitive if s.use_as_feature), "consent": ()})
        rows = rows.copy()
        if schema.label.column not in rows:
            rows[schema.label.column] = schema.label.negative[0]  # read, never used: scores ignore labels
        if schema.id.column and schema.id.column not in rows:
            rows[schema.id.column] = [str(i) for i in rows.index]
    names = [str(c) for c in rows.columns]
    _check_columns(Path(source), schema, names)
    if len(rows) == 0:
        raise DataError("expected customer rows, found none", path=source)
    raw = _parquet_text(rows.set_axis(names, axis=1)[_wanted(schema, names)].reset_index(drop=True), first_row=0)
    return _validate(raw, schema=schema, path=Path(source), report=ValidationReport(path=source))


def _only_header(path: Path) -> DataError:
    return DataError("expected customer rows after the header, found none (the table has only a header)",
                     path=str(path), line=1)


def _arrow_can_read(path: Path, schema: Schema, *, delimiter: str | None) -> bool:
    """Whether Arrow's CSV parser reads this file as fedcrm's own would (same header, derived ids)."""
    if schema.id.derive:
        return False  # derived ids are line numbers, which only the line-counting reader knows
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        header_line = _first_line(f.read(_SNIFF_BYTES))
    fields = next(csv.reader([header_line], delimiter=csv_delimiter(path, schema, given=delimiter)), [])
    return fields == [h.strip() for h in fields] and len(set(fields)) == len(fields)


def _arrow_csv_chunks(
    path: Path, schema: Schema, *, chunk_rows: int, delimiter: str | None
) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.csv as pv

    given = delimiter
    delimiter, source = delimiter_and_source(path, schema, given=given)
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        head = f.read(_SNIFF_BYTES)
        header = _split_header(_first_line(head), delimiter)
    header_at = head.splitlines().index(_first_line(head)) + 1
    row_bytes = len(head.encode("utf-8")) // max(1, head.count("\n")) + 1
    _check_columns(path, schema, header, line=header_at, delimiter=delimiter)
    wanted = _wanted(schema, header)
    try:
        reader = pv.open_csv(
            path,
            # About chunk_rows rows per block (the row size as in the first lines): memory stays flat.
            read_options=pv.ReadOptions(block_size=max(1 << 16, chunk_rows * row_bytes)),
            parse_options=pv.ParseOptions(delimiter=delimiter),
            convert_options=pv.ConvertOptions(
                include_columns=wanted, column_types={c: pa.string() for c in wanted},
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
        done = 0
        for batch in reader:
            frame = batch.to_pandas()
            frame.attrs["lines"] = np.arange(header_at + 1 + done, header_at + 1 + done + len(frame))
            frame.attrs["delimiter"], frame.attrs["delimiter_from"] = delimiter, source
            done += len(frame)
            yield frame
    except pa.ArrowInvalid as e:
        raise DataError(f"not a readable {delimiter!r}-separated table: {e}", path=str(path)) from None


class _SeenIds:
    """Customer ids already read from earlier chunks, as sorted 64-bit hashes with their lines.

    8 + 8 bytes a row instead of the ids themselves; two different ids share a hash with probability
    about n² / 2⁶⁵ (3e-8 for a million customers), which would be reported as a duplicate.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hashes = np.empty(0, dtype=np.uint64)
        self.lines = np.empty(0, dtype=np.int64)

    def add(self, ids: np.ndarray, lines: np.ndarray, *, column: str | None) -> None:
        h = pd.util.hash_array(ids.astype(object))
        if len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
            again = self.hashes[at] == h
            if again.any():
                first = int(np.flatnonzero(again)[0])
                same = np.array([self.lines[at[first]], lines[first]])
                raise DataError(
                    f"customer id {ids[first]!r} appears more than once ({_lines_text(same)}); ids must be unique",
                    path=str(self.path), line=int(same[0]), column=column,
                )
        order = np.argsort(np.concatenate([self.hashes, h]), kind="stable")  # two sorted runs: near linear
        self.hashes = np.concatenate([self.hashes, h])[order]
        self.lines = np.concatenate([self.lines, lines])[order]


def _validate(
    raw: pd.DataFrame, *, schema: Schema, path: Path, report: ValidationReport, seen: _SeenIds | None = None
) -> CustomerTable:
    """Parse and check the text frame ``raw`` (one table, or one chunk of one); adds to ``report``."""
    n = len(raw)
    report.rows_read += n
    lines = np.asarray(raw.attrs.get("lines", np.arange(2, n + 2)), dtype=np.int64)

    id_column = schema.id.column or (schema.id.derived_column if schema.id.derived_column in raw else None)
    if id_column:
        ids = raw[id_column].astype(str).str.strip().to_numpy(dtype=object)
        blank = ids == ""
        if blank.any():
            raise _fail(path, lines[blank], id_column, "expected a customer id, found an empty cell")
    else:
        ids = np.asarray([f"{schema.id.prefix}{ln:06d}" for ln in lines], dtype=object)
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        first = ids[dup][0]
        same = lines[ids == first]
        raise DataError(
            f"customer id {first!r} appears {len(same)} times ({_lines_text(same)}); "
            f"ids must be unique ({int(dup.sum())} rows share an id)",
            path=str(path), line=int(same[0]), column=id_column,
        )
    if seen is not None:
        seen.add(ids, lines, column=id_column)

    lab = schema.label
    label_text = raw[lab.column].astype(str).str.strip()
    pos = label_text.isin(lab.positive).to_numpy()
    neg = label_text.isin(lab.negative).to_numpy()
    bad = ~(pos | neg)
    if bad.any():
        raise _fail(path, lines[bad], lab.column,
                    f"expected a label value among {list(lab.positive + lab.negative)}, found "
                    f"{label_text.to_numpy()[bad][0]!r}")

    drop = np.zeros(n, dtype=bool)
    values: dict[str, pd.Series] = {}
    for col in schema.model_columns:
        values[col.name], d = _parse_column(raw[col.name], col, lines=lines, path=path, report=report)
        drop |= d
        if d.any():
            report.rows_dropped[f"missing {col.name}"] += int(d.sum())
    sensitive: dict[str, Any] = {}
    for s in schema.sensitive:
        parsed = values.get(s.column.name)
        if parsed is None:
            parsed, d = _parse_column(raw[s.column.name], s.column, lines=lines, path=path, report=report)
            drop |= d
            if d.any():
                report.rows_dropped[f"missing {s.column.name}"] += int(d.sum())
        sensitive[s.column.name] = _band(parsed.to_numpy(dtype=float), s.bands) if s.bands else parsed.to_numpy()
    consent: dict[str, np.ndarray] = {}
    for c in schema.consent:
        text = raw[c.column].astype(str).str.strip()
        granted = text.isin(c.granted).to_numpy()
        bad = ~(granted | text.isin(c.refused).to_numpy())
        if bad.any():
            raise _fail(path, lines[bad], c.column,
                        f"consent must be one of {list(c.granted + c.refused)}, found {text.to_numpy()[bad][0]!r}")
        consent[c.purpose] = granted

    keep = ~drop
    report.rows_kept += int(keep.sum())
    table = CustomerTable(
        schema=schema,
        ids=ids,
        labels=pos.astype(np.int64),
        values=pd.DataFrame(values),
        sensitive=pd.DataFrame(sensitive, index=range(n)),
        consent=pd.DataFrame(consent, index=range(n)),
        lines=lines,
        report=report,
    )
    return table if keep.all() else table.subset(keep)


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, modification time, size) of a file, or None if it does not exist.

    Changes when the file is written in place or replaced (a re-import, rsync and most copy tools write
    a new file, hence a new inode, even when they keep the modification time).
    """
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RowBoundedCache:
    """What a region derives from its table, kept between messages by one client process.

    A region's table is read, validated and encoded once, not at every message: values are kept with
    :meth:`remember` under a key that names every file they were derived from (by inode, modification time
    and size) and every setting that shaped them, so an edited table, a new tombstone or a consent
    withdrawal builds them again (see ``Region.load``).

    Bounded by rows, not by entries: in simulation one process serves many small regions in turn, and
    a cache of a few tables would miss on every message. The least recently used go first; the one just
    added always stays, however large.
    """

    def __init__(self, *, max_rows: int = 2_000_000) -> None:
        self.max_rows = max_rows
        self._entries: dict[Hashable, tuple[Any, int]] = {}

    def remember(self, key: Hashable, build: Callable[[], T], *, rows: Callable[[T], int]) -> T:
        """The value cached under ``key``, or ``build()``'s, cached as ``rows(value)`` rows."""
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recently used goes last, evicted last
            return cast(T, self._entries[key][0])
        value = build()
        self._entries[key] = (value, rows(value))
        while len(self._entries) > 1 and sum(n for _, n in self._entries.values()) > self.max_rows:
            self._entries.pop(next(iter(self._entries)))
        return value
