"""Real Flower simulations on tiny synthetic federations: results, the ledger, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import yaml
from conftest import exact_holdout_metrics, write_tiny_config

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import load_weights, read_metrics


def dp_accounting_epsilon(events: list, delta: float) -> float:
    """ε of the ledger's events by Google's dp_accounting (independent of Opacus): DP-SGD steps as
    Poisson-subsampled Gaussians, evaluation answers as plain Gaussian mechanisms."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
    acct = dp_accounting.rdp.RdpAccountant(orders)
    for e in events:
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        if e.mechanism == "gaussian":
            acct.compose(gaussian, e.steps)
        else:
            acct.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian), e.steps)
    return acct.get_epsilon(delta)


def worst_customer_epsilon(events: list, delta: float) -> float:
    """Training customers and hold-out customers are disjoint: the region's ε is the worse of the two."""
    train = [e for e in events if e.mechanism != "gaussian"]
    holdout = [e for e in events if e.mechanism == "gaussian"]
    return max(dp_accounting_epsilon(train, delta), dp_accounting_epsilon(holdout, delta))


def _ray_processes() -> list[str]:
    """Ray processes started by this test process (other programs on the machine may run their own)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines() if ln.strip()]
    children: dict[int, list[int]] = {}
    args = {}
    for pid, ppid, *rest in rows:
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = rest[0] if rest else ""
    mine, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            mine.add(child)
            todo.append(child)
    return [args[p] for p in mine if any(k in args[p] for k in ("raylet", "ray::", "gcs_server"))]


def test_dp_run_writes_results_and_ledger_matches_dp_accounting_and_spend_continues(tmp_path: Path) -> None:
    # Big enough that DP training learns reliably: with the tiny default (1,200 customers) the served model's
    # exact AUC ranged 0.54-0.70 over fresh noise draws; at 5,000 it ranged 0.68-0.72 in 8 draws, same time.
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 3000, "us": 2000}))
    state = tmp_path / "state"
    before = time.time()
    summary = run_simulated(cfg, run_dir=tmp_path / "run1", state_root=state, report=lambda s: None)
    after = time.time()

    for key in ("auc", "log_loss", "accuracy", "brier"):
        assert np.isfinite(summary.final_metrics[key])
    # The pooled AUC is a DP answer: on hold-outs this small its noise is large, and the summary says how
    # large. The model itself is checked exactly, at the regions, against scikit-learn.
    noisy, noise_sd = summary.final_metrics["auc"], summary.final_metrics["auc_noise_sd"]
    assert 0 <= noisy <= 1 and noise_sd > 0
    exact = exact_holdout_metrics(cfg, run_dir=tmp_path / "run1", state=tmp_path / "state")["auc"]
    assert exact > 0.6  # the synthetic label depends on the features
    assert abs(noisy - exact) < 5 * noise_sd + 0.05
    assert (noise_sd > 0.03) == any("noise alone moves it" in w for w in summary.warnings)
    on_disk = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert on_disk["final_metrics"] == summary.final_metrics
    # The summary's shape, pinned: reports, sweeps, MLflow and old run folders read these keys.
    assert list(on_disk) == [
        "name",
        "run_id",
        "task",
        "privacy_mode",
        "final_metrics",
        "final_metrics_by_region",
        "suppressed_regions",
        "privacy",
        "regions",
        "events",
        "warnings",
        "shards",
        "model_version",
        "rounds_completed",
        "config_sha256",
        "code_version",
        "started",
        "wall_time_s",
        "audit_head",
        "fairness",
        "feature_importance",
    ]
    assert sorted(on_disk["events"]) == ["failed", "refused", "rejected"]
    assert sorted(next(iter(on_disk["privacy"].values()))) == [
        "accountant",
        "budget",
        "delta",
        "epsilon",
        "refused",
        "releases_this_run",
        "target_epsilon",
    ]
    # The start time MLflow's metric timestamps count from (metrics.jsonl's time_s is relative to it).
    assert before <= on_disk["started"] <= on_disk["started"] + on_disk["wall_time_s"] <= after + 0.01
    rows = read_metrics(tmp_path / "run1" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["epsilon"]) == {"eu", "us"}
    assert sorted(p.name for p in (tmp_path / "run1" / "checkpoints").iterdir()) == [
        "round-0001-shard-0.npz",
        "round-0002-shard-0.npz",
    ]
    final = load_weights(tmp_path / "run1" / "model" / "constituent-0.npz")
    last_ckpt = load_weights(tmp_path / "run1" / "checkpoints" / "round-0002-shard-0.npz")
    assert all(np.array_equal(final[k], last_ckpt[k]) for k in final)
    assert yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())["name"] == "tiny"

    first_eps = {}
    for region in ("eu", "us"):
        p = summary.privacy[region]
        ledger = PrivacyLedger.open(state / region, region=region)
        events = ledger.events()
        # Two training rounds, then the served model's two DP answers (evaluation; fairness and importance).
        assert [e.mechanism for e in events] == ["dp_sgd", "dp_sgd", "gaussian", "gaussian"]
        assert all(e.status == "sent" for e in events)
        reference = worst_customer_epsilon(events, p["delta"])
        assert p["epsilon"] == pytest.approx(reference, rel=0.01)
        train_eps = dp_accounting_epsilon(events[:2], p["delta"])
        assert train_eps <= cfg.privacy.target_epsilon
        assert train_eps >= 0.97 * cfg.privacy.target_epsilon  # the run ends at, not short of, the target
        first_eps[region] = p["epsilon"]

    # A second run on the same regions continues their spend: it does not start from zero.
    again = run_simulated(cfg, run_dir=tmp_path / "run2", state_root=state, report=lambda s: None)
    for region in ("eu", "us"):
        events = PrivacyLedger.open(state / region, region=region).events()
        assert len(events) == 8
        eps = again.privacy[region]["epsilon"]
        assert eps > first_eps[region] * 1.2
        assert eps == pytest.approx(worst_customer_epsilon(events, again.privacy[region]["delta"]), rel=0.01)

    assert not _ray_processes(), "the simulation left Ray processes running"


def test_policy_and_budget_refusals_are_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    no_churn = tmp_path / "us-policy.yaml"
    no_churn.write_text("allowed_purposes: [propensity]\n")
    tight = tmp_path / "apac-policy.yaml"
    tight.write_text("privacy_budget: 0.5\n")
    path = write_tiny_config(
        tmp_path,
        regions={"eu": 600, "us": 400, "apac": 400},
        overrides={"policies": {"us": str(no_churn), "apac": str(tight)}},
    )
    cfg = load_config(path)
    lines: list[str] = []
    summary = run_simulated(cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lines.append)

    # Fixed codes on the wire; the words, with the ε figures, stay in each region's audit log.
    assert summary.privacy["us"]["refused"] == wire.REFUSED_PURPOSE
    assert summary.privacy["apac"]["refused"] == wire.REFUSED_BUDGET
    assert summary.privacy["eu"]["refused"] is None
    assert any("region us will not take part" in ln for ln in lines)
    # Refused regions spent nothing; the one that trained did.
    assert (
        not (tmp_path / "state" / "us" / "privacy_ledger.sqlite").exists()
        or not PrivacyLedger.open(tmp_path / "state" / "us", region="us").events()
    )
    assert PrivacyLedger.open(tmp_path / "state" / "apac", region="apac").events() == []
    assert summary.privacy["eu"]["epsilon"] > 0
    assert np.isfinite(summary.final_metrics["auc"])


def test_a_run_stops_with_the_reasons_when_too_few_regions_can_take_part(tmp_path: Path) -> None:
    from fedcrm.errors import FederationError

    deny = tmp_path / "deny.yaml"
    deny.write_text("allowed_purposes: [propensity]\n")
    path = write_tiny_config(
        tmp_path, overrides={"policies": {"eu": str(deny), "us": str(deny)}, "federation.min_regions": 1}
    )
    with pytest.raises(FederationError, match=wire.REFUSED_PURPOSE):
        run_simulated(load_config(path), run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None)


def test_client_level_dp_runs_through_flowers_wrapper_and_warns_with_few_regions(tmp_path: Path) -> None:
    policy = tmp_path / "any-dp.yaml"
    policy.write_text("required_privacy: any\n")  # client-level DP needs the regions' consent
    path = write_tiny_config(
        tmp_path,
        overrides={
            "privacy.mode": "client_dp",
            "privacy.client_noise_multiplier": 2.0,
            "policies": {"eu": str(policy), "us": str(policy)},
        },
    )
    summary = run_simulated(
        load_config(path), run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None
    )
    assert any("client-level DP with only 2 regions protects little" in w for w in summary.warnings)
    assert any("not against the server" in w for w in summary.warnings)
    events = PrivacyLedger.open(tmp_path / "state" / "eu", region="eu").events()
    trained = [e for e in events if e.mechanism == "dp_sgd"]
    # Charged at σ/2: one customer moves their region's clipped update by up to 2C (issue 23).
    assert len(trained) == 2 and all(e.sample_rate == 1.0 and e.noise_multiplier == 1.0 for e in trained)
    assert all(p["against_server"].startswith("∞") for p in summary.privacy.values())
    assert np.isfinite(summary.final_metrics["log_loss"])
