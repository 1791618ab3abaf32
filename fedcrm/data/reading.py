"""Reading a table file as text, column by column: CSV (its delimiter detected) or Parquet.

Only the schema's columns are kept (data minimisation). Every reader records the line each row starts
on, so a later error can point at the line an editor shows (the header is line 1).
"""

from __future__ import annotations

import csv
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fedcrm.data.schema import Schema
from fedcrm.errors import DataError


@dataclass
class TextChunk:
    """Rows of a table as Arrow text columns (the schema's, as read), with the line each row starts on."""

    columns: dict[str, pa.Array]
    lines: np.ndarray
    delimiter: str | None = None  # the CSV delimiter it was read with (None: Parquet or a DataFrame)
    delimiter_from: str | None = None  # who said so: "region", "schema" or "detected"

    def __len__(self) -> int:
        return len(self.lines)

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    def __getitem__(self, column: str) -> pa.Array:
        return self.columns[column]

    @classmethod
    def of_frame(cls, frame: pd.DataFrame) -> TextChunk:
        """The text frame of :func:`read_raw` (its lines and delimiter in ``frame.attrs``)."""
        return cls(
            columns={str(c): pa.array(frame[c].to_numpy(dtype=object), type=pa.string()) for c in frame.columns},
            lines=np.asarray(frame.attrs.get("lines", np.arange(2, len(frame) + 2)), dtype=np.int64),
            delimiter=frame.attrs.get("delimiter"),
            delimiter_from=frame.attrs.get("delimiter_from"),
        )


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
    check_columns(path, schema, names)
    wanted = names if all_columns else wanted_columns(schema, names)
    return parquet_text(pq.read_table(path, columns=wanted).to_pandas(), first_row=0)


def parquet_text(frame: pd.DataFrame, *, first_row: int) -> pd.DataFrame:
    """Parquet values as the text a CSV of the same table would hold (the parsers read text)."""
    out = frame.astype(object).where(frame.notna(), "")
    out = out.map(lambda v: v if isinstance(v, str) else _num_text(v))
    # Parquet has no lines; rows are numbered as the same table written as CSV would be (header = 1).
    out.attrs["lines"] = np.arange(first_row + 2, first_row + len(out) + 2)
    return out


def parquet_chunks(path: Path, schema: Schema, *, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken Parquet file
        raise _not_a_table(path, f"Parquet could not read it ({e})") from None
    names = file.schema_arrow.names
    check_columns(path, schema, names)
    done = 0
    for batch in file.iter_batches(batch_size=chunk_rows, columns=wanted_columns(schema, names)):
        yield parquet_text(batch.to_pandas(), first_row=done)
        done += batch.num_rows
    if done == 0:
        empty = file.schema_arrow.empty_table().select(wanted_columns(schema, names))
        yield parquet_text(empty.to_pandas(), first_row=0)


def wanted_columns(schema: Schema, header: list[str]) -> list[str]:
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
        return DataError(
            f"expected UTF-8 text, found byte 0x{data[e.start]:02x} that is not UTF-8 (save the table as UTF-8)",
            path=str(path),
            line=line,
        )
    return DataError("expected UTF-8 text", path=str(path))


def _picker(keep: list[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """A fast function taking the kept fields of a record, as a tuple (itemgetter of one is not one)."""
    if len(keep) == 1:
        only = keep[0]
        return lambda record: (record[only],)
    getter = operator.itemgetter(*keep)
    return lambda record: getter(record)  # type: ignore[no-any-return]


def csv_chunks(
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
        out = pd.DataFrame(
            {k: np.asarray(c, dtype=object) for k, c in enumerate(columns)}, index=range(len(rows)), dtype=object
        )
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
                    check_columns(path, schema, header, line=line, delimiter=delimiter)
                    keep = (
                        list(range(len(header)))
                        if all_columns
                        else [header.index(c) for c in wanted_columns(schema, header)]
                    )
                    pick = _picker(keep)
                    width = len(header)
                    continue
                if len(record) != width:
                    raise DataError(
                        f"expected {len(header)} {delimiter!r}-separated fields as in the header (line "
                        f"{header_at}), found {len(record)} (a stray delimiter, an unclosed quote, or a "
                        "truncated line?)",
                        path=str(path),
                        line=line,
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
    return next(csv_chunks(path, schema, all_columns=all_columns, chunk_rows=None, given_delimiter=delimiter))


def read_raw(path: Path, schema: Schema, *, all_columns: bool = False, delimiter: str | None = None) -> pd.DataFrame:
    """The schema's columns of the file, as text; nothing else is kept (data minimisation).

    A table whose schema derives ids may carry them in ``id.derived_column`` (written by a split).
    ``all_columns`` keeps every column (for :func:`fedcrm.data.split.split_table`, which copies rows
    as they are). ``frame.attrs["lines"]`` holds the line each row starts on (the header is line 1).
    ``delimiter``: the region's own for this file (else the schema's or detected; see
    :func:`delimiter_and_source`).
    """
    path = Path(path)
    if table_kind(path) == "parquet":
        return _read_parquet(path, schema, all_columns=all_columns)
    return _read_csv(path, schema, all_columns=all_columns, delimiter=delimiter)


def table_kind(path: Path) -> str:
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


def check_columns(
    path: Path, schema: Schema, found: list[str], *, line: int | None = None, delimiter: str | None = None
) -> None:
    dupes = sorted({c for c in found if found.count(c) > 1 and c in schema.columns_read()})
    if dupes:
        raise DataError(
            f"the header names column {dupes[0]!r} twice; which one is meant is ambiguous",
            path=str(path),
            line=line,
            column=dupes[0],
        )
    missing = [c for c in schema.columns_read() if c not in found]
    if not missing:
        return
    if len(found) <= 1:
        how = f" with delimiter {delimiter!r}" if delimiter else ""
        raise DataError(
            f"does not look like a table of schema {schema.name}: expected a header with columns such as "
            f"{schema.columns_read()[:4]}, found {len(found)} field{'s' if len(found) != 1 else ''}{how}: "
            f"{[f[:40] for f in found[:4]]} (wrong file, or wrong delimiter?)",
            path=str(path),
            line=line,
        )
    raise DataError(
        f"expected column{'s' if len(missing) > 1 else ''} {missing} (required by schema {schema.name}), "
        f"found a header without {'them' if len(missing) > 1 else 'it'}: {found}",
        path=str(path),
        line=line if line is not None else 1,
        column=missing[0],
    )


def only_header(path: Path) -> DataError:
    return DataError(
        "expected customer rows after the header, found none (the table has only a header)", path=str(path), line=1
    )


def arrow_can_read(path: Path, schema: Schema, *, delimiter: str | None) -> bool:
    """Whether Arrow's CSV parser reads this file as fedcrm's own would (same header, derived ids)."""
    if schema.id.derive:
        return False  # derived ids are line numbers, which only the line-counting reader knows
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        header_line = _first_line(f.read(_SNIFF_BYTES))
    fields = next(csv.reader([header_line], delimiter=csv_delimiter(path, schema, given=delimiter)), [])
    return fields == [h.strip() for h in fields] and len(set(fields)) == len(fields)


def arrow_csv_chunks(path: Path, schema: Schema, *, chunk_rows: int, delimiter: str | None) -> Iterator[TextChunk]:
    import pyarrow.csv as pv

    given = delimiter
    delimiter, source = delimiter_and_source(path, schema, given=given)
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        head = f.read(_SNIFF_BYTES)
        header = _split_header(_first_line(head), delimiter)
    header_at = head.splitlines().index(_first_line(head)) + 1
    row_bytes = len(head.encode("utf-8")) // max(1, head.count("\n")) + 1
    check_columns(path, schema, header, line=header_at, delimiter=delimiter)
    wanted = wanted_columns(schema, header)
    try:
        reader = pv.open_csv(
            path,
            # About chunk_rows rows per block (the row size as in the first lines): memory stays flat.
            read_options=pv.ReadOptions(block_size=max(1 << 16, chunk_rows * row_bytes)),
            parse_options=pv.ParseOptions(delimiter=delimiter),
            convert_options=pv.ConvertOptions(
                include_columns=wanted,
                column_types={c: pa.string() for c in wanted},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        done = 0
        for batch in reader:
            # Arrow's text arrays as they are: no pandas frame, no Python string per cell.
            yield TextChunk(
                columns={c: batch.column(c) for c in wanted},
                lines=np.arange(header_at + 1 + done, header_at + 1 + done + batch.num_rows),
                delimiter=delimiter,
                delimiter_from=source,
            )
            done += batch.num_rows
    except pa.ArrowInvalid as e:
        raise DataError(f"not a readable {delimiter!r}-separated table: {e}", path=str(path)) from None
