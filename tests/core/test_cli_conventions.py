"""CLI conventions: ``-h`` everywhere, ``--version``, ``--json`` documents on stdout, distinct exit codes,
and ``fedcrm run --set`` overrides typed, validated and recorded in the run's config.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import typer
import yaml
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm import __version__, cli
from fedcrm.cli import app
from fedcrm.commands.common import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PRIVACY_REFUSAL,
    EXIT_USAGE,
)
from fedcrm.errors import ConfigError, PolicyError, PrivacyBudgetError
from fedcrm.privacy.ledger import PrivacyLedger

runner = CliRunner()


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            found += _commands(sub, (*path, name))
    return found


@pytest.mark.parametrize("path", _commands(typer.main.get_command(app)), ids=" ".join)
def test_dash_h_is_help_on_every_command_and_group(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"fedcrm {__version__}"


def test_exit_codes_are_distinct_and_privacy_refusals_are_3() -> None:
    codes = [EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_PRIVACY_REFUSAL, EXIT_INTERRUPTED]
    assert codes == [0, 1, 2, 3, 130]
    from fedcrm.commands.common import exit_code

    assert exit_code(ConfigError("x")) == 2
    assert exit_code(PolicyError("x")) == exit_code(PrivacyBudgetError("x")) == 3


def test_a_missing_table_exits_2_and_a_broken_audit_chain_exits_1_with_json(tmp_path: Path) -> None:
    assert runner.invoke(app, ["data", "validate", "--schema", "nope.yaml", str(tmp_path / "x.csv")]).exit_code == 2
    from fedcrm.governance.audit_log import AuditLog

    log = AuditLog.open(tmp_path / "audit.log")
    for i in range(3):
        log.append(actor="t", action="refusal", details={"i": i})
    ok = runner.invoke(app, ["audit", "verify", str(tmp_path / "audit.log"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    lines = (tmp_path / "audit.log").read_text().split("\n")
    lines[1] = lines[1].replace('"i":1', '"i":7')
    (tmp_path / "audit.log").write_text("\n".join(lines))
    bad = runner.invoke(app, ["audit", "verify", str(tmp_path / "audit.log"), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["first_bad_line"] == 2


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130


def test_set_overrides_are_typed_validated_and_recorded(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path, regions={"eu": 300, "us": 300})
    bad = runner.invoke(app, ["run", str(config), "--set", "training.rounds=abc"])
    assert bad.exit_code == 2 and "training.rounds" in bad.output
    unknown = runner.invoke(app, ["run", str(config), "--set", "training.roundz=3"])
    assert unknown.exit_code == 2 and "unknown key `training.roundz`" in unknown.output
    result = runner.invoke(
        app,
        [
            "run",
            str(config),
            "--set",
            "training.rounds=1",
            "--set",
            "privacy.target_epsilon=1",
            "--out",
            str(tmp_path / "run"),
            "--state",
            str(tmp_path / "state"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # one JSON document on stdout; progress went to stderr
    assert summary["run_dir"] == str(tmp_path / "run")
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["training"]["rounds"] == 1 and recorded["privacy"]["target_epsilon"] == 1.0
    # The override reached the planner: the training releases end within ε = 1. The region's ε (its worst-off
    # customer's) also counts the hold-out's evaluation answers, which the target does not plan.
    for region, p in summary["privacy"].items():
        ledger = PrivacyLedger.open(tmp_path / "state" / region, region=region)
        trained = ledger.epsilon_by_shard(shards=1, delta=p["delta"], accountant=p["accountant"])[0]
        assert 0.9 <= trained <= 1.0 + 1e-6, (region, trained)
        held_out = ledger.epsilon_of_holdout(delta=p["delta"], accountant=p["accountant"])
        assert p["epsilon"] == pytest.approx(max(trained, held_out), rel=1e-6)
