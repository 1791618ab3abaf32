"""Erasure by exclusion: `forget` makes the served model stop using the constituent that trained on the
customer at once (new version, weights and checkpoints destroyed, no ε), and the retrain restores it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.served import ServedModel
from fedcrm.models import build_model, ensemble_proba, get_weights, set_weights
from fedcrm.runs import RunDir, load_weights
from fedcrm.unlearning.erasure import RunView, forget
from fedcrm.unlearning.retrain import plan_retrain


@pytest.fixture
def sharded(tmp_path: Path) -> dict:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200})).with_overrides({"unlearning.shards": 4})
    ids = [str(i) for i in load_table(cfg.regions["eu"], load_schema(cfg.schema_path)).ids]
    rd = RunDir.create(tmp_path / "run", cfg)
    weights = {k: get_weights(build_model(cfg.model, n_features=4, seed=k)) for k in range(4)}
    rd.save_model(constituents=weights, feature_names=["a", "b", "c", "d"], version=1)
    for k in range(4):
        rd.save_checkpoint(round_=1, shard=k, weights=weights[k])
    return {"cfg": cfg, "ids": ids, "run": rd.path, "state": tmp_path / "state" / "eu", "weights": weights}


def _forget(s: dict, cid: str, shard: int) -> list:
    view = RunView(run_dir=s["run"], shards=4, model_version=None, trained={cid: shard})
    return forget(state_dir=s["state"], region="eu", customer_ids=[cid], table_ids=np.asarray(s["ids"]), runs=[view])


def test_forget_serves_the_mean_of_the_other_constituents_at_once_without_training_or_epsilon(sharded: dict) -> None:
    run, a, b = sharded["run"], sharded["ids"][0], sharded["ids"][1]
    kept = [0, 1, 3]
    expected = [load_weights(run / "model" / f"constituent-{k}.npz") for k in kept]
    [req] = _forget(sharded, a, 2)

    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["version"] == 2 and meta["shards"] == kept and meta["excluded_shards"] == [2]
    assert not (run / "model" / "constituent-2.npz").exists()
    assert not list((run / "checkpoints").glob("round-*-shard-2.npz"))
    assert len(list((run / "checkpoints").glob("round-*.npz"))) == 3
    assert not (sharded["state"] / "privacy_ledger.sqlite").exists()  # no release, no ε
    entry = next(iter(req.runs.values()))
    assert (req.status, entry.status, entry.excluded_at_version) == ("excluded", "excluded", 2)
    receipt = json.loads((run / "receipts" / f"{req.request_id}.json").read_text())
    assert receipt["runs"][0]["served_by"] == "exclusion"
    assert "served by exclusion at version 2" in receipt["runs"][0]["note"]

    served = ServedModel.load(run)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    models = []
    for w in expected:
        m = build_model(sharded["cfg"].model, n_features=4, seed=0)
        set_weights(m, w)
        models.append(m)
    assert np.allclose(served.proba(x), ensemble_proba(models, x))

    # A second request on the same shard: already excluded, no new version; both wait for one retrain.
    [req_b] = _forget(sharded, b, 2)
    assert json.loads((run / "model" / "model.json").read_text())["version"] == 2
    assert next(iter(req_b.runs.values())).excluded_at_version == 2
    plan = plan_retrain(run, state_root=sharded["state"].parent)
    assert plan.stale == [2] and plan.base_version == 2 and plan.target_version == 3
    assert sorted(p.request_id for p in plan.pending) == sorted([req.request_id, req_b.request_id])


def test_the_last_served_constituent_is_not_excluded_the_request_waits_for_the_retrain(sharded: dict) -> None:
    run = sharded["run"]
    for i, k in enumerate(range(3)):
        _forget(sharded, sharded["ids"][i], k)
    [last] = _forget(sharded, sharded["ids"][3], 3)
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["shards"] == [3] and meta["version"] == 4
    assert next(iter(last.runs.values())).status == "pending" and last.status == "pending"
    assert (run / "model" / "constituent-3.npz").exists()
