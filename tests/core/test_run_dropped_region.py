"""A region that drops out of ``fedcrm run`` is named in the run's output with its fixed refusal code and
where its details are (its audit log under the state folder); the run ends without a traceback. A bad row in
one region once ended the run in a TypeError from the summary printer (exit 1), its δ being unknown.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm import wire
from fedcrm.cli import app


def test_a_bad_row_in_one_region_names_the_region_its_code_and_its_audit_log(tmp_path: Path, one_thread: None) -> None:
    config = write_tiny_config(tmp_path, regions={"eu": 300, "us": 300})
    table = tmp_path / "data" / "us.csv"
    header, first, *rest = table.read_text().splitlines()
    cells = first.split(",")
    cells[header.split(",").index("monthly_spend")] = "abc"  # a number expected
    table.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    state = tmp_path / "state"

    result = CliRunner().invoke(app, ["run", str(config), "--state", str(state)])
    assert result.exception is None and result.exit_code == 0, result.output
    audit = state / "us" / "audit.log"
    assert f"region us did not take part in full: {wire.REFUSED_DATA_UNUSABLE}" in result.stdout
    assert f"details in its audit log {audit}" in result.stdout
    # The details are there: the file, line and column, for the data owner (never sent to the server).
    refusals = [json.loads(line) for line in audit.read_text().splitlines() if '"refusal"' in line]
    assert any("monthly_spend" in r["details"]["reason"] for r in refusals)
