"""One request store, one receipt format, one keyed-token file, every write through fedcrm.durable; old
state folders (two stores, two token files) are migrated when first opened."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import REPO

from fedcrm.errors import StorageError
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.request_store import CONSENT_WITHDRAWAL, ERASURE, RequestStore
from fedcrm.unlearning.shards import region_secret
from fedcrm.unlearning.tombstones import Tombstones, id_token

RECEIPT_SCHEMA = json.loads((REPO / "schemas" / "receipt-v1.schema.json").read_text())


def _legacy_state(state: Path, run: Path) -> dict[str, str]:
    """A state folder as fedcrm wrote it before the one store: two token files, two request stores."""
    secret = region_secret(state)
    gone, said_no = id_token("c-1", secret=secret), id_token("c-2", secret=secret)
    (state / "tombstones.txt").write_text(gone + "\n")
    (state / "consent_withdrawals.txt").write_text(f"churn {said_no}\n")
    (state / "erasures").mkdir()
    old_erasure = {
        "request_id": "erasure-20260101T000000-0000abcd",
        "region": "eu",
        "customer_ref": "r" * 64,
        "shard_key": 7,
        "requested_at": "2026-01-01T00:00:00.000000+00:00",
        "requested_by": "dpo",
        "tombstoned_at": "2026-01-01T00:00:01.000000+00:00",
        "status": "pending",
        "runs": {
            str(run.resolve()): {
                "shard": 1,
                "shards": 2,
                "status": "pending",
                "model_version_before": 1,
                "model_version_after": None,
                "served_at": None,
                "epsilon_before": None,
                "epsilon_after": None,
                "note": "",
            }
        },
    }
    (state / "erasures" / f"{old_erasure['request_id']}.json").write_text(json.dumps(old_erasure))
    row = {
        "request_id": "consent-20260102T000000-0000beef",
        "kind": "consent_withdrawal",
        "purpose": "churn",
        "customer_ref": "s" * 64,
        "requested": "2026-01-02T00:00:00+00:00",
        "stale_constituents": [{"run_dir": str(run.resolve()), "shard": 0, "shards": 2, "model_version": 1}],
    }
    (state / "pending_requests.jsonl").write_text(json.dumps(row) + '\n{"torn')
    return {"erasure": old_erasure["request_id"], "consent": row["request_id"]}


def test_an_old_state_folder_is_migrated_to_one_token_file_and_one_request_store(tmp_path: Path) -> None:
    state, run = tmp_path / "state" / "eu", tmp_path / "run"
    state.mkdir(parents=True)
    ids = _legacy_state(state, run)
    ids_array = np.asarray(["c-1", "c-2", "c-3"], dtype=object)

    withdrawals = ConsentWithdrawals(state)  # the first open merges the withdrawals into the one file
    assert not (state / "consent_withdrawals.txt").exists()
    assert withdrawals.path == Tombstones(state).path == state / "tombstones.txt"
    assert Tombstones(state).mask(ids_array).tolist() == [True, False, False]
    assert withdrawals.mask(ids_array, purpose="churn").tolist() == [False, True, False]
    assert withdrawals.mask(ids_array, purpose="propensity").tolist() == [False, False, False]
    assert withdrawals.purposes_of("c-2") == ["churn"]

    store = RequestStore(state, region="eu")
    assert not (state / "erasures").exists() and not (state / "pending_requests.jsonl").exists()
    by_id = {r.request_id: r for r in store.all()}
    assert by_id[ids["erasure"]].kind == ERASURE and by_id[ids["erasure"]].recorded_at is not None
    assert by_id[ids["erasure"]].deadline.startswith("2026-01-31")  # 30 days, the default policy
    consent = by_id[ids["consent"]]
    assert consent.kind == CONSENT_WITHDRAWAL and consent.purpose == "churn"
    assert [(e.shard, e.status) for e in consent.runs.values()] == [(0, "pending")]
    assert [r.request_id for r in store.open_for(run)] == sorted(ids.values())
    for r in store.all():
        receipt = json.loads((state / "receipts" / f"{r.request_id}.json").read_text())
        jsonschema.validate(receipt, RECEIPT_SCHEMA)
    assert RequestStore(state, region="eu").all() == store.all()  # migrating again changes nothing


def test_a_full_disk_while_tombstoning_raises_a_storage_error_and_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "eu"
    tombstones = Tombstones(state)
    tombstones.add(["c-1"])
    before = tombstones.path.read_bytes()

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="disk is full"):
        tombstones.add(["c-2"])
    with pytest.raises(StorageError, match="disk is full"):
        ConsentWithdrawals(state).add("c-3", purpose="churn")
    monkeypatch.undo()
    assert tombstones.path.read_bytes() == before
    assert not Tombstones(state).contains("c-2")
