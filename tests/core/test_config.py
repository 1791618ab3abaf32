"""Experiment configs: validated once at load, errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedcrm.config import load_config
from fedcrm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["schema"] = str(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_load() -> None:
    for name in ("demo", "churn_telco_dp", "propensity_bank_dp"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.privacy.mode == "sample_dp" and cfg.privacy.target_epsilon == 3.0


def test_negative_epsilon_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, privacy__target_epsilon=-1)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "privacy.target_epsilon" in str(e.value) and "-1" in str(e.value)


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path, training__epochs=3)
    with pytest.raises(ConfigError, match=r"unknown key `training.epochs`"):
        load_config(path)


def test_wrong_type_and_unknown_choice_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.kind"):
        load_config(_write(tmp_path, model__kind="forest"))
    with pytest.raises(ConfigError, match=r"training.rounds"):
        load_config(_write(tmp_path, training__rounds="many"))


def test_missing_schema_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(_write(tmp_path, schema="nowhere.yaml"))


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path))
    assert cfg.with_overrides({"privacy.target_epsilon": 1.0}).privacy.target_epsilon == 1.0
    with pytest.raises(ConfigError, match="unknown key `privacy.epsilon`"):
        cfg.with_overrides({"privacy.epsilon": 1.0})
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        cfg.with_overrides({"privacy.target_epsilon": 0})
