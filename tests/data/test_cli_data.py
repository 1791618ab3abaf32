"""``fedcrm data validate|split|synth``: the report, the exit codes, the files, and ``--help``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrm.cli import app

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "configs" / "schemas"
TELCO = ROOT.parent / "shared" / "data" / "telco_customer_churn.csv"
runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["data"], ["data", "validate"], ["data", "split"], ["data", "synth"]])
def test_help_works_for_every_data_command(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.skipif(not TELCO.exists(), reason=f"the public Telco table is not at {TELCO}")
def test_validate_prints_the_report_and_exits_0_on_telco() -> None:
    schema = str(SCHEMAS / "telco_churn.yaml")
    result = runner.invoke(app, ["data", "validate", "--schema", schema, str(TELCO)])
    assert result.exit_code == 0, result.output
    assert "7043 rows read, 7043 kept" in result.output
    assert "TotalCharges" in result.output and "11" in result.output
    as_json = runner.invoke(app, ["data", "validate", "--schema", schema, str(TELCO), "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["rows_read"] == report["rows_kept"] == 7043
    assert report["columns"] == {"TotalCharges": {"missing_indicated": 11}}


def test_validate_exits_2_with_file_line_and_column_on_a_bad_file(tmp_path: Path) -> None:
    runner.invoke(app, ["data", "synth", "--regions", "eu", "--customers", "20", "--out", str(tmp_path)])
    lines = (tmp_path / "eu.csv").read_text().splitlines()
    cells = lines[5].split(",")
    cells[1] = "ten"  # tenure_months of the customer on line 6
    lines[5] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["data", "validate", "--schema", str(SCHEMAS / "synthetic_crm.yaml"), str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:6: column `tenure_months`: expected a number, found 'ten'" in result.stderr


def test_validate_reports_a_missing_schema_file_as_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", "--schema", str(tmp_path / "none.yaml"), str(tmp_path)])
    assert result.exit_code == 2
    assert "none.yaml" in result.stderr


def test_synth_then_split_then_validate(tmp_path: Path) -> None:
    synth = runner.invoke(
        app,
        ["data", "synth", "--regions", "2", "--customers", "150,250", "--seed", "3", "--out", str(tmp_path / "synth")],
    )
    assert synth.exit_code == 0, synth.output
    assert "400 customers in 2 regions" in synth.output
    assert {p.name for p in (tmp_path / "synth").iterdir()} == {
        "region-000.csv",
        "region-001.csv",
        "manifest.json",
        "ground_truth.json",
    }
    schema = str(SCHEMAS / "synthetic_crm.yaml")
    args = [
        "data",
        "split",
        "--schema",
        schema,
        "--input",
        str(tmp_path / "synth" / "region-001.csv"),
        "--regions",
        "eu, us,apac",
        "--by",
        "dirichlet:2",
        "--seed",
        "9",
    ]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert first.exit_code == 0 and again.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert list(manifest["regions"]) == ["eu", "us", "apac"]
    assert sum(r["rows"] for r in manifest["regions"].values()) == 250
    for r in ("eu", "us", "apac"):
        assert f"{r}: {manifest['regions'][r]['rows']} customers" in first.output
        assert (tmp_path / "a" / f"{r}.csv").read_bytes() == (tmp_path / "b" / f"{r}.csv").read_bytes()
        ok = runner.invoke(app, ["data", "validate", "--schema", schema, str(tmp_path / "a" / f"{r}.csv")])
        assert ok.exit_code == 0, ok.output


def test_split_with_a_bad_method_exits_2(tmp_path: Path) -> None:
    runner.invoke(app, ["data", "synth", "--regions", "eu", "--customers", "20", "--out", str(tmp_path)])
    result = runner.invoke(
        app,
        [
            "data",
            "split",
            "--schema",
            str(SCHEMAS / "synthetic_crm.yaml"),
            "--input",
            str(tmp_path / "eu.csv"),
            "--regions",
            "a,b",
            "--by",
            "random",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2
    assert "--by must be hash, column:NAME or dirichlet:ALPHA, got 'random'" in result.stderr
    assert not (tmp_path / "out").exists()
