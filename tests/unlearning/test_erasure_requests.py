"""The erasure request store and `forget` without a federation: refusals change nothing, a crash half-way
through is completed by running again, a single-shard run warns that an erasure is a full retrain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.errors import ConfigError, UnlearningError
from fedcrm.governance.request_store import RequestStore, run_key
from fedcrm.models import build_model, get_weights
from fedcrm.runs import RunDir
from fedcrm.unlearning.erasure import RunView, forget
from fedcrm.unlearning.marker import RUN_MARKER
from fedcrm.unlearning.retrain import plan_retrain
from fedcrm.unlearning.tombstones import Tombstones


@pytest.fixture
def region(tmp_path: Path) -> dict:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    table = load_table(cfg.regions["eu"], load_schema(cfg.schema_path))
    return {"cfg": cfg, "ids": table.ids, "state": tmp_path / "state" / "eu"}


def _fake_run(tmp_path: Path, cfg, *, shards: int) -> Path:
    """A run folder as `fedcrm run` leaves it (config, model version 1), without training."""
    cfg = cfg.with_overrides({"unlearning.shards": shards})
    run = RunDir.create(tmp_path / "run", cfg)
    w = get_weights(build_model(cfg.model, n_features=4, seed=0))
    run.save_model(constituents=dict.fromkeys(range(shards), w), feature_names=["a", "b", "c", "d"], version=1)
    return run.path


def _on_disk(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file()) if state.exists() else []


def test_an_unknown_id_refuses_the_whole_request_and_writes_nothing(region: dict) -> None:
    good = str(region["ids"][0])
    with pytest.raises(UnlearningError, match="not in the region's table: nobody-42"):
        forget(state_dir=region["state"], region="eu", customer_ids=[good, "nobody-42"], table_ids=region["ids"])
    assert RequestStore(region["state"], region="eu").all() == []
    assert not Tombstones(region["state"]).contains(good)


def test_a_customer_forgotten_twice_is_refused_with_the_first_request(region: dict) -> None:
    cid = str(region["ids"][1])
    first = forget(state_dir=region["state"], region="eu", customer_ids=[cid], table_ids=region["ids"])
    files = _on_disk(region["state"])
    with pytest.raises(UnlearningError, match=f"already forgotten .*{first[0].request_id}"):
        forget(
            state_dir=region["state"], region="eu", customer_ids=[cid, str(region["ids"][2])], table_ids=region["ids"]
        )
    assert _on_disk(region["state"]) == files
    assert not Tombstones(region["state"]).contains(str(region["ids"][2]))


def test_a_crash_before_the_tombstone_is_completed_by_running_forget_again(
    region: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = str(region["ids"][3])

    def crash(self: Tombstones, ids: list[str]) -> list[str]:
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(Tombstones, "add", crash)
        with pytest.raises(OSError):
            forget(state_dir=region["state"], region="eu", customer_ids=[cid], table_ids=region["ids"])
    [pending] = RequestStore(region["state"], region="eu").all()
    assert pending.status == "pending" and pending.recorded_at is None
    [done] = forget(state_dir=region["state"], region="eu", customer_ids=[cid], table_ids=region["ids"])
    assert done.request_id == pending.request_id and done.recorded_at is not None
    assert len(RequestStore(region["state"], region="eu").all()) == 1
    assert Tombstones(region["state"]).contains(cid)


def test_the_store_and_marker_hold_no_id_and_a_single_shard_run_warns_of_a_full_retrain(
    region: dict, tmp_path: Path
) -> None:
    run = _fake_run(tmp_path, region["cfg"], shards=1)
    a, b = str(region["ids"][4]), str(region["ids"][5])
    view = RunView(run_dir=run, shards=1, model_version=1, trained={a: 0})  # b: hold-out, never trained on
    reqs = forget(state_dir=region["state"], region="eu", customer_ids=[a, b], table_ids=region["ids"], runs=[view])
    key = run_key(run)
    assert [r.runs[key].status for r in reqs] == ["pending", "not_trained"]
    receipt = json.loads((run / "receipts" / f"{reqs[1].request_id}.json").read_text())
    assert receipt["runs"][0]["model_version_after"] == 1 and receipt["runs"][0]["shard"] is None
    for p in [*region["state"].rglob("*"), *run.rglob("*")]:
        if p.is_file():
            assert a.encode() not in p.read_bytes() and b.encode() not in p.read_bytes(), p
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["stale"] == [{"region": "eu", "request_id": reqs[0].request_id, "shard": 0}]
    plan = plan_retrain(run, state_root=region["state"].parent)  # the plan only: nothing is trained
    assert plan.stale == [0] and plan.target_version == 2
    assert any("retrains the WHOLE model" in w for w in plan.warnings)


def test_the_shard_key_finds_the_customer_in_a_run_with_any_number_of_shards(region: dict) -> None:
    from fedcrm.unlearning.shards import region_secret, shard_of

    ids = [str(i) for i in region["ids"][10:20]]
    reqs = forget(state_dir=region["state"], region="eu", customer_ids=ids, table_ids=region["ids"])
    secret = region_secret(region["state"])
    for s in (2, 4, 8):
        want = shard_of(np.asarray(ids, dtype=object), shards=s, secret=secret)
        assert [r.shard_key % s for r in reqs] == list(want)


def test_slicing_is_refused_with_a_clear_config_error(region: dict) -> None:
    with pytest.raises(ConfigError, match="unlearning.slices = 4 is not supported yet"):
        region["cfg"].with_overrides({"unlearning.slices": 4})
