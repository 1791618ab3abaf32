"""A real (tiny) simulated run: fairness and feature importance in summary.json, explain and audit CLIs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.config import TrainingConfig, load_config
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.served import ServedModel
from fedcrm.fl.simulation import run_simulated
from fedcrm.models import get_weights
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.region import NodeSettings, Region
from fedcrm.runs import save_weights
from fedcrm.training import train_locally
from fedcrm.unlearning.tombstones import Tombstones

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("trust")
    policy = tmp / "policy.yaml"
    policy.write_text("min_customers: 1\n")  # no suppression, so pooled results can be compared exactly
    path = write_tiny_config(tmp, regions={"eu": 600, "us": 240}, overrides={
        "model": {"kind": "mlp", "hidden": [16, 16]},
        "policies": {"eu": str(policy), "us": str(policy)},
    })
    cfg = load_config(path)
    summary = run_simulated(cfg, run_dir=tmp / "run", state_root=tmp / "state", report=lambda s: None)
    return {"cfg": cfg, "summary": summary, "run": tmp / "run", "state": tmp / "state"}


def _holdout(run: dict[str, Any], region: str):  # noqa: ANN202
    cfg = run["cfg"]
    r = Region(NodeSettings(region=region, data_path=cfg.regions[region], state_dir=run["state"] / region))
    return r.load(cfg, load_schema(cfg.schema_path))


def test_summary_fairness_matches_fairlearn_on_pooled_hold_out_predictions(run: dict[str, Any]) -> None:
    fl_metrics = pytest.importorskip("fairlearn.metrics")
    on_disk = json.loads((run["run"] / "summary.json").read_text())
    fair = on_disk["fairness"]
    assert set(fair) == {"gender", "age"}
    served = ServedModel.load(run["run"])
    scores, labels, groups = [], [], {"gender": [], "age": []}
    for region in run["cfg"].regions:
        data = _holdout(run, region)
        scores.append(served.proba(data.x[data.holdout]))
        labels.append(data.y[data.holdout])
        for a in groups:
            groups[a].append(np.asarray(data.sensitive[a])[data.holdout])
    s, y = np.concatenate(scores), np.concatenate(labels)
    y_pred = (s >= 0.5).astype(int)
    assert sum(g["customers"] for g in fair["gender"]["groups"].values()) == len(s)
    for a in groups:
        g = np.concatenate(groups[a]).astype(str)
        frame = fl_metrics.MetricFrame(metrics={"ppr": fl_metrics.selection_rate}, y_true=y, y_pred=y_pred,
                                       sensitive_features=g)
        for name, row in frame.by_group.iterrows():
            assert fair[a]["groups"][name]["positive_prediction_rate"] == pytest.approx(row["ppr"], abs=1e-9)
            assert fair[a]["groups"][name]["customers"] == (g == name).sum()
        assert fair[a]["demographic_parity_difference"] == pytest.approx(
            fl_metrics.demographic_parity_difference(y, y_pred, sensitive_features=g), abs=1e-9)
        eod = fl_metrics.equalized_odds_difference(y, y_pred, sensitive_features=g)
        if np.isfinite(eod):
            assert fair[a]["equalized_odds_difference"] == pytest.approx(eod, abs=1e-9)
    imp = on_disk["feature_importance"]
    assert imp["customers"] == len(s) and imp["regions"] == 2
    columns = {c.name for c in load_schema(run["cfg"].schema_path).model_columns}
    assert set(imp["mean_abs_contribution_points"]) == columns


def test_explain_cli_scores_and_explains_one_customer_and_refuses_a_forgotten_one(run: dict[str, Any]) -> None:
    data = _holdout(run, "eu")
    cid = str(data.ids[0])
    res = runner.invoke(app, ["explain", "--region", "eu", "--customer-id", cid, "--model", str(run["run"]),
                              "--state", str(run["state"]), "--json", "--top", "20"])
    assert res.exit_code == 0, res.output
    e = json.loads(res.output)
    assert e["score"] == pytest.approx(float(ServedModel.load(run["run"]).proba(data.x[:1])[0]), abs=1e-6)
    assert sum(c["points"] for c in e["contributions"]) == pytest.approx(
        (e["score"] - e["reference_score"]) * 100, abs=0.2)
    assert "churn risk by" in e["contributions"][0]["text"]

    forgotten = str(data.ids[1])
    Tombstones(run["state"] / "eu").add([forgotten])
    try:
        res = runner.invoke(app, ["explain", "--region", "eu", "--customer-id", forgotten, "--model",
                                  str(run["run"]), "--state", str(run["state"])])
        assert res.exit_code == 3 and "forgotten" in res.output  # a privacy refusal
    finally:
        path = run["state"] / "eu" / "tombstones.txt"
        path.unlink()


def test_audit_privacy_cli_is_consistent_for_the_dp_run_and_fails_loudly_for_a_leaky_model(
    run: dict[str, Any], tmp_path: Path
) -> None:
    res = runner.invoke(app, ["audit", "privacy", str(run["run"]), "--state", str(run["state"]), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((run["run"] / "privacy_audit.json").read_text())
    for region, r in report["regions"].items():
        assert r["verdict"] == "consistent", region
        assert r["mode"] == "black-box"
        assert r["claimed_epsilon"] == pytest.approx(run["summary"]["privacy"][region]["epsilon"], rel=1e-6)
        assert r["epsilon_lower_bound"] <= r["claimed_epsilon"]

    # A model that memorised region eu's training customers, placed in a copy of the run: as if the
    # DP path had been broken. The audit must refute the claim and exit non-zero.
    leaky_run = tmp_path / "leaky"
    shutil.copytree(run["run"], leaky_run, ignore=shutil.ignore_patterns(".flwr"))
    data = _holdout(run, "eu")
    served = ServedModel.load(leaky_run)
    model = served.models[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model trains faster on one thread
    try:
        train_locally(model, x=data.x[~data.holdout], y=data.y[~data.holdout],
                      training=TrainingConfig(local_epochs=150, batch_size=32, learning_rate=0.01), dp=None,
                      randomness=ReleaseRandomness.public_seed(0))
    finally:
        torch.set_num_threads(threads)
    save_weights(leaky_run / "model" / "constituent-0.npz", get_weights(model))
    res = runner.invoke(app, ["audit", "privacy", str(leaky_run), "--state", str(run["state"]), "--region", "eu",
                              "--claimed-epsilon", "0.05"])
    assert res.exit_code == 3, res.output
    assert "PRIVACY AUDIT FAILED" in res.output


def test_audit_privacy_cli_white_box_passes_the_real_path_and_exits_3_on_a_planted_bug(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["audit", "privacy", str(run["run"]), "--state", str(run["state"]), "--white-box", "--region", "eu",
            "--canaries", "500", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    eu = json.loads((run["run"] / "privacy_audit.json").read_text())["regions"]["eu"]
    assert eu["mode"] == "white-box" and eu["canaries"] == 500 and eu["verdict"] == "consistent"
    assert eu["epsilon_lower_bound"] <= eu["claimed_epsilon"] <= run["cfg"].privacy.target_epsilon + 1e-9

    # The same command on a mechanism whose noise comes from a public seed (the test-only hook, as
    # fedcrm 0.1 did): the audit proves the claim false and the command exits 3.
    from fedcrm.evaluation import white_box_audit as wb

    real = wb.white_box_audit
    monkeypatch.setattr(wb, "white_box_audit", lambda **kw: real(**kw, planted_bug=wb.PlantedBug.PUBLIC_SEED))
    res = runner.invoke(app, args[:-1])
    assert res.exit_code == 3, res.output
    assert "PRIVACY AUDIT FAILED" in res.output and "white-box" in res.output
