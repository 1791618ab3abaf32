"""Loading a customer table through its declared schema: the one validated way data enters fedcrm.

Values are read as text and parsed, so every problem can be reported with the file, the line as an
editor shows it (the header is line 1), the column, what was expected and what was found. Columns
the schema does not name are never read (data minimisation). The parts live in their own modules:
:mod:`~fedcrm.data.reading` (files, delimiters), :mod:`~fedcrm.data.validate` (parsing and checks),
:mod:`~fedcrm.data.table` (the validated table and its report), :mod:`~fedcrm.data.cache`; this
module is the entry point the rest of fedcrm imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fedcrm.data.cache import RowBoundedCache, file_version
from fedcrm.data.reading import (
    TextChunk,
    arrow_can_read,
    arrow_csv_chunks,
    check_columns,
    csv_chunks,
    csv_delimiter,
    delimiter_and_source,
    only_header,
    parquet_chunks,
    parquet_text,
    read_raw,
    table_kind,
    wanted_columns,
)
from fedcrm.data.schema import Schema
from fedcrm.data.table import MISSING, OTHER, ColumnIssues, CustomerTable, ValidationReport
from fedcrm.data.validate import SeenIds, validate
from fedcrm.errors import DataError

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "MISSING",
    "OTHER",
    "ColumnIssues",
    "CustomerTable",
    "RowBoundedCache",
    "ValidationReport",
    "csv_delimiter",
    "delimiter_and_source",
    "file_version",
    "iter_table",
    "load_table",
    "read_raw",
    "table_from_frame",
]


def load_table(path: str | Path, schema: Schema, *, delimiter: str | None = None) -> CustomerTable:
    """Read and validate a customer table; raises :class:`DataError` naming file, line and column.

    ``delimiter``: the region's own for a CSV file (its config), used as given instead of the schema's.
    """
    path = Path(path)
    raw = TextChunk.of_frame(read_raw(path, schema, delimiter=delimiter))
    if len(raw) == 0:
        raise only_header(path)
    report = ValidationReport(path=str(path), delimiter=raw.delimiter, delimiter_from=raw.delimiter_from)
    return validate(raw, schema=schema, path=path, report=report)


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
    kind = table_kind(path)
    report = ValidationReport(path=str(path))
    seen = SeenIds(path)
    fast = kind == "csv" and arrow_can_read(path, schema, delimiter=delimiter)
    chunks: Iterator[pd.DataFrame | TextChunk]
    if kind == "parquet":
        chunks = parquet_chunks(path, schema, chunk_rows=chunk_rows)
    elif fast:
        chunks = arrow_csv_chunks(path, schema, chunk_rows=chunk_rows, delimiter=delimiter)
    else:
        chunks = csv_chunks(path, schema, all_columns=False, chunk_rows=chunk_rows, given_delimiter=delimiter)
    rows = 0
    try:
        for chunk in chunks:
            raw = chunk if isinstance(chunk, TextChunk) else TextChunk.of_frame(chunk)
            report.delimiter, report.delimiter_from = raw.delimiter, raw.delimiter_from
            if len(raw) == 0:
                continue
            rows += len(raw)
            yield validate(raw, schema=schema, path=path, report=report, seen=seen)
    except DataError:
        if fast:
            load_table(path, schema, delimiter=delimiter)  # raises the same problem with the line an editor shows
        raise
    if rows == 0:
        raise only_header(path)


def table_from_frame(
    rows: pd.DataFrame, schema: Schema, *, source: str, model_columns_only: bool = False
) -> CustomerTable:
    """Validate rows held in a DataFrame (a notebook's) as a file with the same columns would be.

    ``model_columns_only``: only the id (else the row's position) and the model's columns are needed,
    for scoring rows whose label, consent and sensitive columns are not at hand.
    """
    if model_columns_only:
        schema = schema.model_copy(
            update={"sensitive": tuple(s for s in schema.sensitive if s.use_as_feature), "consent": ()}
        )
        rows = rows.copy()
        if schema.label.column not in rows:
            rows[schema.label.column] = schema.label.negative[0]  # read, never used: scores ignore labels
        if schema.id.column and schema.id.column not in rows:
            rows[schema.id.column] = [str(i) for i in rows.index]
    names = [str(c) for c in rows.columns]
    check_columns(Path(source), schema, names)
    if len(rows) == 0:
        raise DataError("expected customer rows, found none", path=source)
    raw = parquet_text(rows.set_axis(names, axis=1)[wanted_columns(schema, names)].reset_index(drop=True), first_row=0)
    return validate(TextChunk.of_frame(raw), schema=schema, path=Path(source), report=ValidationReport(path=source))
