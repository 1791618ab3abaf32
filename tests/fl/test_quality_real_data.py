"""The quality the README promises, on the real public tables (slow: full federated runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PERMISSIVE_POLICY, REPO, exact_holdout_metrics, requires_shared_data

from fedcrm.config import load_config
from fedcrm.experiment import materialise_regions
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.slow, requires_shared_data()]


def _run(tmp_path: Path, config: str, overrides: dict | None = None) -> dict:
    cfg = load_config(REPO / "configs" / config).with_overrides(overrides or {})
    if cfg.privacy.mode == "none":  # non-private training needs the regions' consent (their policies)
        cfg = cfg.model_copy(update={"policies": {r: PERMISSIVE_POLICY for r in cfg.regions}})
    cfg = materialise_regions(cfg, data_dir=tmp_path / "regions")
    summary = run_simulated(
        cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None
    ).to_dict()
    # The model's quality exactly, at the regions (the summary's pooled AUC is a DP answer, ± its noise);
    # the privacy of training, from the ledgers' training releases (the hold-outs' answers are apart).
    summary["final_metrics"] = exact_holdout_metrics(cfg, run_dir=tmp_path / "run", state=tmp_path / "state")
    summary["training_epsilon"] = {
        r: PrivacyLedger.open(tmp_path / "state" / r, region=r).epsilon_of_shard(
            shard=0, shards=1, delta=1e-6, accountant=cfg.privacy.accountant
        )
        for r in cfg.regions
    }
    return summary


# Each run draws fresh noise and fresh region secrets (a new hold-out), so its AUC is a random variable:
# over 8 fresh runs (48399b6, 2026-11-30) Telco at ε = 3 gave 0.837 ± 0.010 (0.821-0.851), at ε = 1 0.834 ± 0.009
# (0.817-0.842), without DP (4 runs) 0.850 ± 0.008; Bank at ε = 3 0.761 ± 0.008 (0.749-0.773). The floors
# sit about 4 standard deviations below the mean: a run under them is a regression, not bad luck (the
# earlier Bank floor, 0.76, failed 3 of these 8 runs; Telco's 0.82 at ε = 3 sat 1.7 deviations down).
@pytest.mark.parametrize(("epsilon", "floor"), [(3.0, 0.80), (1.0, 0.79), (None, 0.81)], ids=["eps3", "eps1", "no-dp"])
def test_telco_three_regions_pooled_auc(tmp_path: Path, epsilon: float | None, floor: float) -> None:
    overrides = {"privacy.target_epsilon": epsilon} if epsilon else {"privacy.mode": "none"}
    summary = _run(tmp_path, "churn_telco_dp.yaml", overrides)
    assert summary["final_metrics"]["auc"] >= floor
    for eps in summary["training_epsilon"].values():
        if epsilon:
            assert eps <= epsilon


def test_bank_four_regions_without_duration_pooled_auc(tmp_path: Path) -> None:
    summary = _run(tmp_path, "propensity_bank_dp.yaml")
    assert summary["final_metrics"]["auc"] >= 0.73
    assert all(eps <= 3.0 for eps in summary["training_epsilon"].values())
