"""Deployment overrides: ``flwr run --run-config 'overrides="..."'`` changes config values as ``fedcrm run
--set`` does (typed and validated like the file), and the run's config.yaml records them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from fedcrm.errors import ConfigError
from fedcrm.runs import RunDir
from server.server_app import experiment_config


def test_overrides_are_typed_applied_and_recorded_in_the_run_config(tmp_path: Path) -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert conf["overrides"] == ""  # declared: Flower refuses a --run-config key the app does not declare
    plain = experiment_config(conf)
    cfg = experiment_config(conf | {"overrides": "training.rounds=20  privacy.target_epsilon=1 name='demo b'"})
    assert (cfg.training.rounds, cfg.privacy.target_epsilon, cfg.name) == (20, 1.0, "demo b")
    assert isinstance(cfg.training.rounds, int) and plain.training.rounds != 20
    assert cfg.regions == plain.regions  # everything else as the file says
    RunDir.create(tmp_path / "run", cfg)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["training"]["rounds"] == 20 and recorded["privacy"]["target_epsilon"] == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training.roundz=3", r"run config `overrides`: unknown key `training.roundz`"),
        ("training.rounds", r"run config `overrides` 'training.rounds': expected KEY=VALUE"),
        ("training.rounds=-1", r"training.rounds"),
        ("name='unclosed", r"run config `overrides` .*closing quotation"),
    ],
)
def test_a_bad_override_is_refused_naming_the_run_config(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment_config({"experiment-config": "configs/demo.yaml", "overrides": text})
