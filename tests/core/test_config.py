"""Experiment configs: validated once at load, errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedcrm.config import load_config, load_saved_config
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


@pytest.mark.parametrize(
    ("key", "policy_key"), [("budget", "privacy_budget"), ("evaluation__min_customers", "min_customers")]
)
def test_settings_the_region_policy_decides_are_refused_with_the_reason(
    tmp_path: Path, key: str, policy_key: str
) -> None:
    """They validated once but nothing read them: the region's policy value was used."""
    dotted = key.replace("__", ".")
    path = _write(tmp_path, **{key: 5})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}: `{dotted}` is no longer a setting: the region's policy decides this "
        f"(`{policy_key}` in the data owner's policy file); remove it from the config"
    )
    cfg = load_config(_write(tmp_path))
    with pytest.raises(ConfigError, match=rf"<overrides>: `{dotted}` is no longer a setting: the region's policy"):
        cfg.with_overrides({dotted: 5})


def test_a_run_folder_written_before_the_removal_still_loads(tmp_path: Path) -> None:
    """Older fedcrm wrote `budget: null` and `evaluation.min_customers: 20` into every run's config.yaml;
    the run was trained without reading them, so dropping them keeps the run's config and digest."""
    fresh = load_config(_write(tmp_path))
    old = fresh.to_dict() | {"budget": None}
    old["evaluation"] = old["evaluation"] | {"min_customers": 20}
    saved = tmp_path / "run" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(old))
    loaded = load_saved_config(saved)
    assert loaded == fresh and loaded.digest() == fresh.digest()
    assert "budget" in yaml.safe_load(saved.read_text())  # the run folder itself is left as it was
