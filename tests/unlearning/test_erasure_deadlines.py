"""Deadlines and the retrain budget: `fedcrm erasures status` lists open requests and fails on an overdue
one (audited); `fedcrm budget` and `forget` say how many retrains each shard's budget still allows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.governance.audit_log import AuditLog
from fedcrm.governance.policy import RegionPolicy
from fedcrm.governance.request_store import RequestStore
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import RunDir
from fedcrm.unlearning.budget import retrain_budget
from fedcrm.unlearning.erasure import RunView, forget

runner = CliRunner()


def _run(tmp_path: Path, cfg, *, shards: int, name: str) -> Path:
    cfg = cfg.with_overrides({"unlearning.shards": shards})
    rd = RunDir.create(tmp_path / name, cfg)
    w = get_weights(build_model(cfg.model, n_features=4, seed=0))
    rd.save_model(constituents=dict.fromkeys(range(shards), w), feature_names=["a", "b", "c", "d"], version=1)
    return rd.path


def test_an_overdue_request_still_served_fails_the_status_and_is_audited(tmp_path: Path) -> None:
    assert RegionPolicy().erasure_deadline_days == 30
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    ids = load_table(cfg.regions["eu"], load_schema(cfg.schema_path)).ids
    state = tmp_path / "state"
    single, sharded = _run(tmp_path, cfg, shards=1, name="single"), _run(tmp_path, cfg, shards=4, name="sharded")
    a, b = str(ids[0]), str(ids[1])
    forget(
        state_dir=state / "eu",
        region="eu",
        customer_ids=[a],
        table_ids=ids,
        runs=[RunView(run_dir=single, shards=1, model_version=1, trained={a: 0})],
        deadline_days=10,
    )
    forget(
        state_dir=state / "eu",
        region="eu",
        customer_ids=[b],
        table_ids=ids,
        runs=[RunView(run_dir=sharded, shards=4, model_version=1, trained={b: 1})],
        deadline_days=10,
    )

    res = runner.invoke(app, ["erasures", "status", "--region", "eu", "--state", str(state), "--json"])
    assert res.exit_code == 0, res.output
    listed = {r["runs"][0]["status"]: r for r in json.loads(res.output)["open"]}
    assert set(listed) == {"pending", "excluded"} and 9 < listed["pending"]["days_left"] <= 10
    assert "served by exclusion at version 2" in listed["excluded"]["runs"][0]["how"]

    store = RequestStore(state / "eu", region="eu")
    for req in store.all():  # both requests were made 40 days ago
        req.deadline = "2000-01-01T00:00:00+00:00"
        store.save(req)
    res = runner.invoke(app, ["erasures", "status", "--region", "eu", "--state", str(state), "--json"])
    assert res.exit_code == 1, res.output
    report = json.loads(res.output)
    assert report["overdue"] == [listed["pending"]["request_id"]]  # the excluded one serves no one: not late
    events = [e for e in AuditLog(state / "eu" / "audit.log").entries() if e.action == "erasure_overdue"]
    assert [e.details["request_id"] for e in events] == report["overdue"]


def test_retrains_left_repeat_the_shards_last_run_until_the_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "eu", region="eu")
    release = GaussianRelease(1.1, 0.05, 200)
    for round_ in (1, 2):
        ledger.record_release(shard=0, purpose="churn", run_id="r1", round=round_, release=release, delta=1e-5)
    b = retrain_budget(ledger, shard=0, budget=10.0, delta=1e-5, accountant="rdp")
    want = next(n for n in range(50) if epsilon([release] * (2 + 2 * (n + 1)), delta=1e-5, accountant="rdp") > 10)
    assert b.retrains_left == want and b.retrains_left > 0
    assert b.epsilon_after_one == pytest.approx(epsilon([release] * 4, delta=1e-5, accountant="rdp"))
    tight = retrain_budget(ledger, shard=0, budget=b.epsilon_now + 0.01, delta=1e-5, accountant="rdp")
    assert tight.retrains_left == 0 and not tight.affordable

    res = runner.invoke(app, ["budget", "--region", "eu", "--state", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["retrains_left_by_shard"] == {"0": want}
    assert np.isfinite(b.epsilon_now)


def test_status_prices_a_retrain_at_the_regions_own_delta(tmp_path: Path) -> None:
    """δ is the region's (its policy's, default 1e-6): the status's price is the ledger's ε at that δ."""
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    ids = load_table(cfg.regions["eu"], load_schema(cfg.schema_path)).ids
    state = tmp_path / "state"
    single = _run(tmp_path, cfg, shards=1, name="single")
    ledger = PrivacyLedger.open(state / "eu", region="eu")
    release = GaussianRelease(1.1, 0.05, 200)
    delta = RegionPolicy().delta
    for round_ in (1, 2):
        ledger.record_release(shard=0, purpose="churn", run_id="r1", round=round_, release=release, delta=delta)
    forget(
        state_dir=state / "eu",
        region="eu",
        customer_ids=[str(ids[0])],
        table_ids=ids,
        runs=[RunView(run_dir=single, shards=1, model_version=1, trained={str(ids[0]): 0})],
        deadline_days=10,
    )
    res = runner.invoke(app, ["erasures", "status", "--region", "eu", "--state", str(state), "--json"])
    assert res.exit_code == 0, res.output
    priced = json.loads(res.output)["open"][0]["runs"][0]["retrain"]
    mine = retrain_budget(ledger, shard=0, budget=RegionPolicy().privacy_budget, delta=delta, accountant="rdp")
    assert priced["epsilon_now"] == pytest.approx(mine.epsilon_now)
    assert priced["epsilon_now"] > epsilon([release] * 2, delta=1e-5, accountant="rdp") + 1e-3  # not at 1e-5
