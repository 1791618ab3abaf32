"""The run's summary reads each region's ε as its privacy ledger holds it, even when the regions refuse the
final evaluation: it once fell back to the pre-flight's figure and printed ε spent 0.000 for every region
while the ledgers held the run's training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm import wire
from fedcrm.cli import app
from fedcrm.privacy.ledger import PrivacyLedger


def test_a_refused_final_evaluation_leaves_the_summary_reading_the_ledgers_epsilon(
    tmp_path: Path, one_thread: None
) -> None:
    policy = tmp_path / "policy.yaml"  # no evaluation answer allowed today: the final evaluation is refused
    policy.write_text(yaml.safe_dump({"evaluations_per_day": 0}))
    config = write_tiny_config(
        tmp_path, regions={"eu": 300, "us": 300}, overrides={"policies": {"eu": str(policy), "us": str(policy)}}
    )
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["run", str(config), "--state", str(state), "--json"])
    assert result.exit_code == 0, result.output
    privacy = json.loads(result.stdout)["privacy"]
    for region in ("eu", "us"):
        held = PrivacyLedger.open(state / region, region=region).epsilon(delta=1e-6, accountant="rdp")
        assert held > 1.0  # two rounds of training at target ε 2
        assert privacy[region]["epsilon"] == pytest.approx(held, rel=1e-9), region
        assert privacy[region]["refused"] == f"final evaluation: {wire.REFUSED_BY_POLICY}"
