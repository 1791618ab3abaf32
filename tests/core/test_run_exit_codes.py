"""``fedcrm run`` ends with the documented exit code when the regions refuse it: 3 for a privacy refusal
(every region out on its budget or policy), as a region's own refusal does; with ``--json`` stdout holds an
error document (the error's kind, message and exit code), so a script reading stdout learns why.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.commands.common import EXIT_PRIVACY_REFUSAL, EXIT_USAGE

runner = CliRunner()


def _config(tmp_path: Path, policy: dict) -> Path:
    """Two tiny regions whose data owners both set ``policy``."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return write_tiny_config(
        tmp_path, regions={"eu": 300, "us": 300}, overrides={"policies": {"eu": str(path), "us": str(path)}}
    )


def _run(tmp_path: Path, config: Path, *extra: str):  # noqa: ANN202
    return runner.invoke(app, ["run", str(config), "--state", str(tmp_path / "state"), *extra])


def test_every_region_out_of_budget_exits_3_with_an_error_document(tmp_path: Path, one_thread: None) -> None:
    # Budget 0.5 against a run of target ε 2: each region refuses its first round before training.
    result = _run(tmp_path, _config(tmp_path, {"privacy_budget": 0.5}), "--json")
    assert result.exit_code == EXIT_PRIVACY_REFUSAL, result.output
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "FederationRefused" and error["exit_code"] == EXIT_PRIVACY_REFUSAL
    assert "budget-exhausted" in error["message"]
    audit = tmp_path / "state" / "eu" / "audit.log"
    assert error["dropped_out"]["eu"] == {"reason": "budget-exhausted", "details": str(audit)}


def test_every_region_refusing_the_purpose_exits_3(tmp_path: Path, one_thread: None) -> None:
    result = _run(tmp_path, _config(tmp_path, {"allowed_purposes": ["propensity"]}))
    assert result.exit_code == EXIT_PRIVACY_REFUSAL, result.output
    assert "purpose-not-allowed" in result.output
    # The reason's words stay at the region: the output says where they are.
    audit = tmp_path / "state" / "us" / "audit.log"
    line = f"region us did not take part in full: purpose-not-allowed; details in its audit log {audit}"
    assert line in result.output
    assert "purpose" in audit.read_text()


def test_a_bad_config_with_json_exits_2_with_an_error_document(tmp_path: Path) -> None:
    result = _run(tmp_path, write_tiny_config(tmp_path), "--json", "--set", "training.rounds=abc")
    assert result.exit_code == EXIT_USAGE
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "ConfigError" and "training.rounds" in error["message"]
