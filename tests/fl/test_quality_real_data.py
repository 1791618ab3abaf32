"""The quality the README promises, on the real public tables (slow: full federated runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, requires_shared_data

from fedcrm.config import load_config
from fedcrm.experiment import materialise_regions
from fedcrm.fl.simulation import run_simulated

pytestmark = [pytest.mark.slow, requires_shared_data()]


def _run(tmp_path: Path, config: str, overrides: dict | None = None) -> dict:
    cfg = load_config(REPO / "configs" / config).with_overrides(overrides or {})
    cfg = materialise_regions(cfg, data_dir=tmp_path / "regions")
    return run_simulated(cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None)


@pytest.mark.parametrize(
    ("epsilon", "floor"), [(3.0, 0.82), (1.0, 0.80), (None, 0.83)], ids=["eps3", "eps1", "no-dp"]
)
def test_telco_three_regions_pooled_auc(tmp_path: Path, epsilon: float | None, floor: float) -> None:
    overrides = {"privacy.target_epsilon": epsilon} if epsilon else {"privacy.mode": "none"}
    summary = _run(tmp_path, "churn_telco_dp.yaml", overrides)
    assert summary["final_metrics"]["auc"] >= floor
    for p in summary["privacy"].values():
        if epsilon:
            assert p["epsilon"] <= epsilon


def test_bank_four_regions_without_duration_pooled_auc(tmp_path: Path) -> None:
    summary = _run(tmp_path, "propensity_bank_dp.yaml")
    assert summary["final_metrics"]["auc"] >= 0.76
    assert all(p["epsilon"] <= 3.0 for p in summary["privacy"].values())
