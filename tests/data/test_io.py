"""Loading customer tables through a declared schema: typed errors that point at the file, line and
column, repairs that are counted rather than fatal, and the two real public tables with their quirks.

Bad files are written here byte by byte, so the line an editor would show is known independently of
the loader (header = line 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedcrm.data.io import MISSING, OTHER, iter_table, load_table, read_raw
from fedcrm.data.schema import Schema, load_schema, schema_from_text
from fedcrm.data.synthetic import generate
from fedcrm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "configs" / "schemas"
DATA = ROOT.parent / "shared" / "data"
TELCO = DATA / "telco_customer_churn.csv"
BANK = DATA / "bank_marketing_full.csv"
needs_real_data = pytest.mark.skipif(
    not (TELCO.exists() and BANK.exists()),
    reason=f"the public Telco/Bank tables are not in {DATA} (they live outside the repository)",
)

SCHEMA_YAML = """
name: tiny
delimiter: ","
id: {column: cid}
label: {column: churn, positive: ["yes"], negative: ["no"]}
purposes: [churn]
features:
  - {name: age, type: numeric, min: 18, max: 90}
  - {name: spend, type: numeric, min: 0, max: 100, missing: indicator}
  - {name: plan, type: categorical, vocabulary: [basic, pro]}
  - {name: region, type: categorical, vocabulary: [n, s], missing: fill, fill: n}
  - {name: autopay, type: boolean, true_values: ["y"], false_values: ["n"]}
  - {name: visits, type: numeric, min: 0, max: 10, missing: drop}
"""
HEADER = "cid,churn,age,spend,plan,region,autopay,visits,notes"
GOOD_ROWS = [
    "c1,yes,30,10,basic,n,y,1,secret note one",
    "c2,no,40,20,pro,s,n,2,secret note two",
    "c3,no,50,30,basic,s,y,3,secret note three",
]


@pytest.fixture
def schema() -> Schema:
    return schema_from_text(SCHEMA_YAML)


def write(
    tmp_path: Path, rows: list[str], *, header: str = HEADER, name: str = "t.csv", eol: str = "\n", bom: bool = False
) -> Path:
    path = tmp_path / name
    text = eol.join([header, *rows]) + eol
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def error_of(path: Path, schema: Schema) -> DataError:
    with pytest.raises(DataError) as info:
        load_table(path, schema)
    return info.value


# --- bad input: typed errors naming file, line and column, expected and found ----------------------


def test_a_good_table_loads_with_ids_labels_and_lines(tmp_path: Path, schema: Schema) -> None:
    t = load_table(write(tmp_path, GOOD_ROWS), schema)
    assert list(t.ids) == ["c1", "c2", "c3"]
    assert list(t.labels) == [1, 0, 0]
    assert list(t.lines) == [2, 3, 4]
    assert t.report.rows_read == t.report.rows_kept == 3
    assert t.report.as_dict()["columns"] == {}


def test_missing_column_names_the_column_and_the_header_line(tmp_path: Path, schema: Schema) -> None:
    path = write(tmp_path, ["c1,yes,30,10,basic,n,y,x"], header="cid,churn,age,spend,plan,region,autopay,notes")
    e = error_of(path, schema)
    assert (e.path, e.line, e.column) == (str(path), 1, "visits")
    assert str(e).startswith(f"{path}:1: column `visits`: ")
    assert "expected column ['visits']" in str(e) and "found a header without it" in str(e)


def test_unparseable_number_names_line_column_and_the_value(tmp_path: Path, schema: Schema) -> None:
    rows = [*GOOD_ROWS, "c4,no,forty-two,30,basic,s,y,3,x"]
    e = error_of(write(tmp_path, rows), schema)
    assert (e.line, e.column) == (5, "age")
    assert "expected a number, found 'forty-two'" in str(e)


def test_label_outside_the_declared_spellings(tmp_path: Path, schema: Schema) -> None:
    rows = [GOOD_ROWS[0], "c2,maybe,40,20,pro,s,n,2,x", GOOD_ROWS[2], "c4,Yes,40,20,pro,s,n,2,x"]
    e = error_of(write(tmp_path, rows), schema)
    assert (e.line, e.column) == (3, "churn")
    assert "expected a label value among ['yes', 'no'], found 'maybe'" in str(e)
    assert "(also line 5)" in str(e)


def test_duplicate_customer_ids_list_every_line(tmp_path: Path, schema: Schema) -> None:
    rows = [*GOOD_ROWS, "c2,no,41,20,pro,s,n,2,x"]
    e = error_of(write(tmp_path, rows), schema)
    assert (e.line, e.column) == (3, "cid")
    assert "customer id 'c2' appears 2 times (lines 3, 5)" in str(e)


def test_empty_file_and_blank_only_file(tmp_path: Path, schema: Schema) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert "the file is empty" in str(error_of(empty, schema))
    blank = tmp_path / "blank.csv"
    blank.write_bytes(b"\xef\xbb\xbf\r\n\r\n  \n")
    assert "the file is empty" in str(error_of(blank, schema))


def test_header_only_table(tmp_path: Path, schema: Schema) -> None:
    e = error_of(write(tmp_path, []), schema)
    assert e.line == 1
    assert "expected customer rows after the header, found none" in str(e)


def test_binary_bytes_are_not_a_table(tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "dump.csv"
    path.write_bytes(bytes(range(256)) * 8)
    e = error_of(path, schema)
    assert e.path == str(path)
    assert "not a table" in str(e) and "binary" in str(e)


def test_latin1_text_is_refused_at_the_line_it_starts(tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "\n" + GOOD_ROWS[0] + "\n").encode() + "c2,no,40,20,pro,s,n,2,café\n".encode("latin-1"))
    e = error_of(path, schema)
    assert "expected UTF-8 text, found byte 0xe9" in str(e)
    assert e.line == 3


def test_a_json_file_is_not_a_table(tmp_path: Path, schema: Schema) -> None:
    path = tmp_path / "customers.json"
    path.write_text(json.dumps([{"cid": "c1", "churn": "yes", "age": 30}]))
    e = error_of(path, schema)
    assert "not a table" in str(e) and "JSON" in str(e)
    assert e.path == str(path)


def test_a_one_column_file_says_wrong_file_or_delimiter(tmp_path: Path, schema: Schema) -> None:
    path = write(tmp_path, [r.replace(",", " ") for r in GOOD_ROWS], header=HEADER.replace(",", " "))
    e = error_of(path, schema)  # no delimiter among , ; tab | splits the header into the schema's columns
    assert e.line == 1
    assert "wrong delimiter" in str(e) and "','" in str(e)


def test_the_delimiter_belongs_to_the_file_not_the_schema(tmp_path: Path, schema: Schema) -> None:
    path = write(tmp_path, [r.replace(",", ";") for r in GOOD_ROWS], header=HEADER.replace(",", ";"))
    table = load_table(path, schema)  # the schema declares ",", the file uses ";"
    assert list(table.ids) == ["c1", "c2", "c3"]
    assert table.report.as_dict()["delimiter"] == ";"
    assert load_table(write(tmp_path, GOOD_ROWS, name="comma.csv"), schema).report.delimiter == ","


def test_a_csv_named_parquet_is_refused(tmp_path: Path, schema: Schema) -> None:
    path = write(tmp_path, GOOD_ROWS, name="t.parquet")
    assert "Parquet" in str(error_of(path, schema))


@pytest.mark.parametrize(
    ("row", "column", "line"),
    [
        (",no,40,20,pro,s,n,2,x", "cid", 5),  # empty id
        ("c4,,40,20,pro,s,n,2,x", "churn", 5),  # empty label
        ("c4,no,,20,pro,s,n,2,x", "age", 5),  # numeric, missing: error
        ("c4,no,40,20,,s,n,2,x", "plan", 5),  # categorical, missing: error
        ("c4,no,40,20,pro,s,  ,2,x", "autopay", 5),  # boolean, blank after stripping
    ],
)
def test_an_empty_required_value_names_line_and_column(
    tmp_path: Path, schema: Schema, row: str, column: str, line: int
) -> None:
    e = error_of(write(tmp_path, [*GOOD_ROWS, row]), schema)
    assert (e.line, e.column) == (line, column)
    assert str(e).startswith(f"{tmp_path / 't.csv'}:{line}: column `{column}`: expected ")
    assert "found" in str(e)


def test_a_row_with_too_many_fields_is_reported_at_its_line(tmp_path: Path, schema: Schema) -> None:
    e = error_of(write(tmp_path, [*GOOD_ROWS, "c4,no,40,20,pro,s,n,2,x,extra"]), schema)
    assert e.line == 5
    assert "expected 9 ','-separated fields" in str(e) and "found 10" in str(e)


def test_line_numbers_follow_the_file_through_blank_lines_and_multiline_cells(tmp_path: Path, schema: Schema) -> None:
    rows = [GOOD_ROWS[0], "", 'c2,no,40,20,pro,s,n,2,"a note\nover two lines"', "", "c3,no,x,30,basic,s,y,3,x"]
    # line 1 header, 2 c1, 3 blank, 4-5 c2 (quoted cell spans two lines), 6 blank, 7 c3
    e = error_of(write(tmp_path, rows), schema)
    assert (e.line, e.column) == (7, "age")
    good = load_table(write(tmp_path, rows[:4], name="ok.csv"), schema)
    assert list(good.lines) == [2, 4]


def test_a_header_naming_a_column_twice_is_ambiguous(tmp_path: Path, schema: Schema) -> None:
    e = error_of(write(tmp_path, [r + ",1" for r in GOOD_ROWS], header=HEADER + ",age"), schema)
    assert (e.line, e.column) == (1, "age")
    assert "twice" in str(e)


def test_unknown_category_with_unknown_error_policy_is_an_error(tmp_path: Path) -> None:
    yaml = SCHEMA_YAML.replace("vocabulary: [basic, pro]}", "vocabulary: [basic, pro], unknown: error}")
    strict = schema_from_text(yaml)
    e = error_of(write(tmp_path, [*GOOD_ROWS, "c4,no,40,20,gold,s,n,2,x"]), strict)
    assert (e.line, e.column) == (5, "plan")
    assert "expected one of ['basic', 'pro'], found 'gold'" in str(e)


# --- CSV dialects and Parquet ----------------------------------------------------------------------


def test_bom_crlf_and_padded_cells_read_like_a_plain_file(tmp_path: Path, schema: Schema) -> None:
    plain = load_table(write(tmp_path, GOOD_ROWS, name="plain.csv"), schema)
    padded = [" c1 , yes ,30, 10 ,basic,n , y,1,x", *GOOD_ROWS[1:]]
    crlf = load_table(
        write(
            tmp_path,
            padded,
            name="crlf.csv",
            eol="\r\n",
            bom=True,
            header=" cid ,churn,age,spend,plan,region,autopay,visits,notes",
        ),
        schema,
    )
    assert list(crlf.ids) == list(plain.ids)
    assert list(crlf.lines) == [2, 3, 4]
    pd.testing.assert_frame_equal(crlf.values, plain.values)


def test_an_undeclared_delimiter_is_detected_from_the_schema_columns(tmp_path: Path) -> None:
    loose = schema_from_text(SCHEMA_YAML.replace('delimiter: ","\n', ""))
    # Commas inside the notes would fool a frequency sniffer; the declared column names do not.
    rows = [r.replace(",", ";") + ", and, more, commas" for r in GOOD_ROWS]
    t = load_table(write(tmp_path, rows, header=HEADER.replace(",", ";")), loose)
    assert list(t.ids) == ["c1", "c2", "c3"]


def test_parquet_loads_like_the_same_csv_and_reports_rows_as_lines(tmp_path: Path, schema: Schema) -> None:
    csv_path = write(tmp_path, GOOD_ROWS)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    typed = frame.assign(age=frame["age"].astype("int64"), spend=frame["spend"].astype(float))
    pq.write_table(pa.Table.from_pandas(typed, preserve_index=False), tmp_path / "t.parquet")
    from_csv = load_table(csv_path, schema)
    from_parquet = load_table(tmp_path / "t.parquet", schema)
    assert list(from_parquet.ids) == list(from_csv.ids)
    pd.testing.assert_frame_equal(from_parquet.values, from_csv.values)
    bad = typed.assign(churn=["yes", "no", "perhaps"])
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), tmp_path / "bad.parquet")
    e = error_of(tmp_path / "bad.parquet", schema)
    assert (e.line, e.column) == (4, "churn") and "'perhaps'" in str(e)


def test_a_truncated_parquet_file_is_not_a_table(tmp_path: Path, schema: Schema) -> None:
    frame = pd.read_csv(write(tmp_path, GOOD_ROWS), dtype=str, keep_default_na=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    e = error_of(tmp_path / "cut.parquet", schema)
    assert "not a table" in str(e) and "Parquet" in str(e)


# --- repairs are counted, not fatal ----------------------------------------------------------------


def test_out_of_bounds_numbers_are_clipped_and_counted(tmp_path: Path, schema: Schema) -> None:
    rows = [*GOOD_ROWS, "c4,no,12,150,pro,s,n,2,x", "c5,no,95,-3,pro,s,n,11,x", "c6,no,99,20,pro,s,n,2,x"]
    t = load_table(write(tmp_path, rows), schema)
    assert list(t.values["age"]) == [30, 40, 50, 18, 90, 90]
    assert list(t.values["spend"]) == [10, 20, 30, 100, 0, 20]
    assert list(t.values["visits"]) == [1, 2, 3, 2, 10, 2]
    cols = t.report.as_dict()["columns"]
    assert cols["age"] == {"clipped_low": 1, "clipped_high": 2}
    assert cols["spend"] == {"clipped_low": 1, "clipped_high": 1}
    assert cols["visits"] == {"clipped_high": 1}


def test_unknown_categories_go_to_other_and_are_counted_by_spelling(tmp_path: Path, schema: Schema) -> None:
    rows = [*GOOD_ROWS, "c4,no,40,20,gold,s,n,2,x", "c5,no,40,20,Basic,s,n,2,x", "c6,no,40,20,gold,s,n,2,x"]
    t = load_table(write(tmp_path, rows), schema)
    assert list(t.values["plan"]) == ["basic", "pro", "basic", OTHER, OTHER, OTHER]
    assert t.report.as_dict()["columns"] == {"plan": {"unknown_categories": {"gold": 2, "Basic": 1}}}
    assert t.report.rows_kept == 6


def test_missing_policies_drop_fill_and_indicate_and_are_counted(tmp_path: Path, schema: Schema) -> None:
    rows = [
        "c1,yes,30,,basic,n,y,1,x",  # spend blank -> indicated (NaN)
        "c2,no,40,20,pro,,n,2,x",  # region blank -> filled with n
        "c3,no,50,30,basic,s,y,,x",  # visits blank -> row dropped
        "c4,no,50,,basic,  ,y,,x",  # all three at once -> dropped, but fill and indicator still counted
        "c5,no,60,40,pro,s,n,4,x",
    ]
    t = load_table(write(tmp_path, rows), schema)
    assert list(t.ids) == ["c1", "c2", "c5"]
    assert list(t.lines) == [2, 3, 6]
    assert np.isnan(t.values["spend"][0]) and list(t.values["spend"][1:]) == [20, 40]
    assert list(t.values["region"]) == ["n", "n", "s"]
    assert MISSING not in set(t.values["plan"])
    report = t.report.as_dict()
    assert report["rows_read"] == 5 and report["rows_kept"] == 3
    assert report["rows_dropped"] == {"missing visits": 2}
    assert report["columns"] == {
        "spend": {"missing_indicated": 2},
        "region": {"missing_filled": 2},
        "visits": {"rows_dropped_missing": 2},
    }


def test_a_missing_sensitive_value_dropped_by_policy_is_counted(tmp_path: Path) -> None:
    s = schema_from_text(
        SCHEMA_YAML + "sensitive:\n  - column: {name: notes, type: categorical, vocabulary: [a, b], missing: drop}\n"
    )
    rows = ["c1,yes,30,10,basic,n,y,1,a", "c2,no,40,20,pro,s,n,2,", "c3,no,50,30,basic,s,y,3,b"]
    t = load_table(write(tmp_path, rows), s)
    assert list(t.ids) == ["c1", "c3"]
    assert t.report.rows_dropped == {"missing notes": 1}
    assert list(t.sensitive["notes"]) == ["a", "b"]


def test_only_declared_columns_are_read(tmp_path: Path, schema: Schema) -> None:
    path = write(tmp_path, GOOD_ROWS)
    raw = read_raw(path, schema)
    assert "notes" not in raw.columns
    t = load_table(path, schema)
    for frame in (t.values, t.sensitive, t.consent):
        assert "notes" not in frame.columns
        assert not frame.astype(str).apply(lambda c: c.str.contains("secret")).to_numpy().any()


def test_schema_rejects_a_label_used_as_a_feature_and_bands_on_categories() -> None:
    with pytest.raises(ConfigError, match="label"):
        schema_from_text(SCHEMA_YAML + '  - {name: churn, type: categorical, vocabulary: ["yes", "no"]}\n')
    with pytest.raises(ConfigError, match="bands"):
        schema_from_text(
            SCHEMA_YAML + "sensitive:\n  - column: {name: notes, type: categorical, "
            "vocabulary: [a]}\n    bands: [1, 2]\n"
        )
    with pytest.raises(ConfigError, match="increase"):
        schema_from_text(
            SCHEMA_YAML + "sensitive:\n  - column: {name: notes, type: numeric, min: 0, max: 9}\n    bands: [5, 2]\n"
        )


# --- the synthetic generator's declared defects are what the loader counts --------------------------


def test_synthetic_manifest_defect_counts_equal_the_loader_counts(tmp_path: Path) -> None:
    manifest = generate(regions=["eu", "us"], customers=[4000, 3000], seed=12, out_dir=tmp_path)
    schema = load_schema(SCHEMAS / "synthetic_crm.yaml")
    for region in manifest.regions:
        t = load_table(tmp_path / region.file, schema)
        cols = t.report.as_dict()["columns"]
        loader = {
            "blank_monthly_spend": cols.get("monthly_spend", {}).get("missing_indicated", 0),
            "negative_tenure": cols.get("tenure_months", {}).get("clipped_low", 0),
            "logins_over_max": cols.get("logins_last_30d", {}).get("clipped_high", 0),
            "unknown_plan_spelling": sum(cols.get("plan", {}).get("unknown_categories", {}).values()),
        }
        assert loader == region.defect_counts, region.name
        assert all(n > 0 for n in loader.values()), region.name  # the check has something to compare
        assert t.report.rows_kept == region.rows


# --- the real public tables ------------------------------------------------------------------------


@needs_real_data
def test_telco_loads_with_its_11_blank_total_charges_indicated() -> None:
    t = load_table(TELCO, load_schema(SCHEMAS / "telco_churn.yaml"))
    assert len(t) == t.report.rows_read == 7043
    assert t.report.as_dict()["columns"] == {"TotalCharges": {"missing_indicated": 11}}
    assert t.report.rows_dropped == {}
    reference = pd.read_csv(TELCO, dtype=str, keep_default_na=False)
    blank = reference["TotalCharges"].str.strip() == ""
    assert int(blank.sum()) == 11
    assert set(reference.loc[blank, "tenure"]) == {"0"}
    np.testing.assert_array_equal(np.isnan(t.values["TotalCharges"].to_numpy(float)), blank.to_numpy())
    assert list(t.ids) == list(reference["customerID"])
    assert t.labels.mean() == pytest.approx((reference["Churn"] == "Yes").mean())
    assert set(t.sensitive.columns) == {"gender", "SeniorCitizen"}
    assert "gender" not in t.values.columns and "customerID" not in t.values.columns


@needs_real_data
def test_bank_loads_with_derived_ids_and_never_reads_duration() -> None:
    schema = load_schema(SCHEMAS / "bank_propensity.yaml")
    t = load_table(BANK, schema)
    assert len(t) == 45211
    assert list(t.ids[:3]) == ["bank-000002", "bank-000003", "bank-000004"]
    assert t.ids[-1] == "bank-045212"
    reference = pd.read_csv(BANK, sep=";")
    assert t.labels.mean() == pytest.approx((reference["y"] == "yes").mean())
    # Data minimisation: `duration` and nothing else undeclared reaches the loaded table.
    read = set(read_raw(BANK, schema).columns)
    assert "duration" not in read and read == set(schema.columns_read())
    assert "duration" not in t.values.columns and "duration" not in t.sensitive.columns
    assert set(t.values.columns) == {c.name for c in schema.model_columns}
    # Out-of-bounds values are clipped and counted, as an independent count of the file says.
    cols = t.report.as_dict()["columns"]
    assert cols["balance"].get("clipped_high", 0) == int((reference["balance"] > 100_000).sum())
    assert cols["campaign"].get("clipped_high", 0) == int((reference["campaign"] > 60).sum())
    assert t.values["balance"].max() <= 100_000
    assert set(t.sensitive["age"]) == {"<30", "30-45", "45-60", ">=60"}


# --- the per-process table cache --------------------------------------------------------------------


def test_table_cache_keeps_values_by_key_and_evicts_the_least_recently_used_by_rows() -> None:
    from fedcrm.data.io import RowBoundedCache

    built: list[str] = []

    def build(name: str, n: int):
        return lambda: built.append(name) or list(range(n))

    cache = RowBoundedCache(max_rows=5)
    a = cache.remember("a", build("a", 3), rows=len)
    assert cache.remember("a", build("a", 3), rows=len) is a and built == ["a"]  # kept, not built again
    cache.remember("b", build("b", 2), rows=len)  # 3 + 2 rows: both fit
    cache.remember("a", build("a", 3), rows=len)  # a used last: b is now the least recent
    cache.remember("c", build("c", 1), rows=len)  # 6 rows > 5: b goes, a stays
    assert built == ["a", "b", "c"]
    cache.remember("a", build("a", 3), rows=len)
    cache.remember("b", build("b", 2), rows=len)
    assert built == ["a", "b", "c", "b"]
    # The value just added always stays, even over the bound on its own.
    tiny = RowBoundedCache(max_rows=2)
    big = tiny.remember("big", build("big", 10), rows=len)
    assert tiny.remember("big", build("big", 10), rows=len) is big


SYNTH = load_schema(Path(__file__).resolve().parents[2] / "configs" / "schemas" / "synthetic_crm.yaml")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_table_read_in_chunks_equals_the_table_read_at_once(tmp_path: Path, kind: str) -> None:
    generate(regions=["eu"], customers=2500, seed=3, out_dir=tmp_path)
    path = tmp_path / "eu.csv"
    if kind == "parquet":
        pq.write_table(
            pa.Table.from_pandas(pd.read_csv(path, dtype=str, keep_default_na=False)), path := tmp_path / "eu.parquet"
        )
    whole = load_table(path, SYNTH)
    chunks = list(iter_table(path, SYNTH, chunk_rows=1000))
    assert len(chunks) >= 2
    assert np.concatenate([c.ids for c in chunks]).tolist() == whole.ids.tolist()
    assert np.concatenate([c.lines for c in chunks]).tolist() == whole.lines.tolist()
    pd.testing.assert_frame_equal(pd.concat([c.values for c in chunks], ignore_index=True), whole.values)
    assert chunks[-1].report.as_dict() == whole.report.as_dict()  # one report, complete after the last chunk


def test_an_id_repeated_in_a_later_chunk_is_refused_with_both_lines(tmp_path: Path) -> None:
    generate(regions=["eu"], customers=2500, seed=3, out_dir=tmp_path)
    path = tmp_path / "eu.csv"
    lines = path.read_text().split("\n")
    first_id = lines[1].split(",")[0]
    lines[2200] = ",".join([first_id, *lines[2200].split(",")[1:]])
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        for _ in iter_table(path, SYNTH, chunk_rows=1000):
            pass
    assert f"customer id {first_id!r} appears" in str(info.value) and "lines 2, 2201" in str(info.value)


def test_telco_as_a_european_spreadsheet_exports_it_loads_like_the_original(tmp_path: Path) -> None:
    from conftest import REPO, SHARED_DATA
    from typer.testing import CliRunner

    from fedcrm.cli import app

    source = SHARED_DATA / "telco_customer_churn.csv"
    if not source.exists():
        pytest.skip(f"the public Telco table is not at {source} (set FEDCRM_SHARED_DATA)")
    telco = load_schema(REPO / "configs" / "schemas" / "telco_churn.yaml")  # declares delimiter ","
    eu = tmp_path / "telco_eu.csv"
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame.to_csv(eu, sep=";", index=False, lineterminator="\r\n", encoding="utf-8-sig")
    assert eu.read_bytes().startswith(b"\xef\xbb\xbf") and b";" in eu.read_bytes()[:200]
    assert b"\r\n" in eu.read_bytes()[:2000]
    original, exported = load_table(source, telco), load_table(eu, telco)
    assert exported.ids.tolist() == original.ids.tolist()
    pd.testing.assert_frame_equal(exported.values, original.values)
    assert (exported.report.delimiter, original.report.delimiter) == (";", ",")
    chunks = list(iter_table(eu, telco, chunk_rows=2000))
    assert np.concatenate([c.ids for c in chunks]).tolist() == original.ids.tolist()
    assert chunks[-1].report.delimiter == ";"
    result = CliRunner().invoke(
        app, ["data", "validate", "--schema", str(REPO / "configs" / "schemas" / "telco_churn.yaml"), str(eu), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["delimiter"] == ";"


def test_a_regions_own_delimiter_is_used_as_given_and_reported(tmp_path: Path, schema: Schema) -> None:
    semi = write(tmp_path, [r.replace(",", ";") for r in GOOD_ROWS], header=HEADER.replace(",", ";"), name="s.csv")
    given = load_table(semi, schema, delimiter=";")
    assert list(given.ids) == ["c1", "c2", "c3"]
    assert given.report.as_dict()["delimiter_from"] == "region"
    assert (given.report.delimiter, given.report.delimiter_from) == (";", "region")
    assert load_table(semi, schema).report.delimiter_from == "detected"
    comma = write(tmp_path, GOOD_ROWS, name="c.csv")
    assert load_table(comma, schema).report.delimiter_from == "schema"
    # Streaming reads (fedcrm score) take it too, on both of their parsers.
    chunks = list(iter_table(semi, schema, chunk_rows=2, delimiter=";"))
    assert [c for t in chunks for c in t.ids] == ["c1", "c2", "c3"]
    assert (chunks[-1].report.delimiter, chunks[-1].report.delimiter_from) == (";", "region")
    # Given is given: a region that says "," about a ";" file gets the wrong-delimiter error, no guess.
    with pytest.raises(DataError, match="wrong delimiter"):
        load_table(semi, schema, delimiter=",")
