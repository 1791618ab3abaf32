"""One secret per region: the audit log names customers under a key derived from the region's secret,
keeps no salt file of its own, and a state folder written before (with ``audit.log.salt``) keeps working.

Expected references are computed here with ``hmac`` from the bytes on disk, not with fedcrm's helpers,
and the old state folders are written by hand, as fedcrm left them before one secret per region.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

import pytest
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.errors import StorageError
from fedcrm.governance.audit_log import GENESIS_PREV, AuditLog, verify
from fedcrm.governance.audit_trail import region_audit_log, server_audit_log
from fedcrm.governance.customer_refs import hash_customer_id
from fedcrm.governance.request_store import RequestStore
from fedcrm.models import build_model, get_weights
from fedcrm.region import NodeSettings, Region
from fedcrm.runs import RunDir
from fedcrm.state.secret import region_secret
from fedcrm.unlearning.erasure import RunView, forget

DOMAIN = b"fedcrm/audit-customer-ref"
runner = CliRunner()


def _ref(key: bytes, customer_id: str) -> str:
    return hmac.new(key, customer_id.encode(), hashlib.sha256).hexdigest()


def _region_key(state: Path) -> bytes:
    """The audit key as the design states it: HMAC(region secret, domain), from the file's bytes."""
    secret = (state / "region_secret.key").read_text().strip()
    return hmac.new(secret.encode(), DOMAIN, hashlib.sha256).digest()


def _secret_files(state: Path) -> list[str]:
    """Files that hold a key (tombstones.txt holds keyed tokens, not a key)."""
    return sorted(
        str(p.relative_to(state))
        for p in state.rglob("*")
        if p.is_file() and (p.suffix in {".key", ".salt"} or "secret" in p.name)
    )


# --- a fresh region ---------------------------------------------------------------------------------


def test_a_region_state_folder_holds_exactly_one_secret_after_a_run_a_forget_and_an_export(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    state = tmp_path / "state" / "eu"
    settings = NodeSettings(region="eu", data_path=cfg.regions["eu"], state_dir=state, schema_path=cfg.schema_path)
    data = Region(settings).load(
        cfg, load_schema(cfg.schema_path)
    )  # the region's side of a run: pre-flight, policy, audit log
    run = RunDir.create(tmp_path / "run", cfg)
    run.save_model(
        constituents={0: get_weights(build_model(cfg.model, n_features=4, seed=0))},
        feature_names=["a", "b", "c", "d"],
        version=1,
    )
    gone, kept = str(data.ids[0]), str(data.ids[1])
    forget(
        state_dir=state,
        region="eu",
        customer_ids=[gone],
        table_ids=data.ids,
        runs=[RunView(run_dir=run.path, shards=1, model_version=1, trained={gone: 0})],
    )
    result = runner.invoke(
        app,
        [
            "export",
            "--region",
            "eu",
            "--customer-id",
            kept,
            "--data",
            str(cfg.regions["eu"]),
            "--schema",
            str(cfg.schema_path),
            "--out",
            str(tmp_path / "x.json"),
            "--state",
            str(state.parent),
        ],
    )
    assert result.exit_code == 0, result.output

    assert _secret_files(state) == ["region_secret.key"]
    assert stat.S_IMODE((state / "region_secret.key").stat().st_mode) == 0o600
    key = _region_key(state)
    entries = AuditLog(state / "audit.log").entries()
    [requested] = [e for e in entries if e.action == "erasure_requested"]
    assert requested.details["customer"] == _ref(key, gone)
    [exported] = [e for e in entries if e.action == "export_served"]
    assert exported.details["customer"] == _ref(key, kept)
    assert json.loads((tmp_path / "x.json").read_text())["customer_ref"] == _ref(key, kept)
    assert not any(e.action == "customer_key_changed" for e in entries)  # nothing to migrate


def test_the_audit_key_is_domain_separated_from_the_secret_and_from_other_uses(tmp_path: Path) -> None:
    log = region_audit_log(tmp_path)
    secret = region_secret(tmp_path).encode()
    assert log.customer_ref("42") == _ref(_region_key(tmp_path), "42")
    assert log.customer_ref("42") != _ref(secret, "42")  # not the raw secret, which keys shards and tokens
    assert log.customer_refs("42") == (log.customer_ref("42"),)
    other = tmp_path / "other"
    assert region_audit_log(other).customer_ref("42") != log.customer_ref("42")  # another region, another key
    with pytest.raises(ValueError, match="at least 16 bytes"):
        hash_customer_id("42", key=b"short")


def test_the_servers_log_names_no_customer_and_needs_no_key(tmp_path: Path) -> None:
    log = server_audit_log(tmp_path / "run")
    log.append(actor="server", action="run_started", details={"name": "x"})
    assert not hasattr(log, "customer_ref")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["audit.log"]


def test_a_region_secret_other_users_can_read_is_refused(tmp_path: Path) -> None:
    region_secret(tmp_path)
    os.chmod(tmp_path / "region_secret.key", 0o640)
    refused = r"region_secret\.key: the region's secret is open to other users .*chmod 600"
    with pytest.raises(StorageError, match=refused):
        region_secret(tmp_path)
    with pytest.raises(StorageError, match="chmod 600"):
        region_audit_log(tmp_path).customer_ref("42")


# --- a state folder from before: audit.log.salt -----------------------------------------------------


def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _old_state(state: Path, *, refs: dict[str, str]) -> tuple[bytes, str]:
    """A region state folder as fedcrm wrote it before one secret per region: the secret, a salt next to
    the audit log, and a log whose entries name customers under that salt. Returns (salt, head)."""
    state.mkdir(parents=True)
    secret = state / "region_secret.key"
    secret.write_text(secrets.token_hex(32))
    salt = secrets.token_bytes(32)
    (state / "audit.log.salt").write_text(salt.hex() + "\n")
    for p in (secret, state / "audit.log.salt"):
        os.chmod(p, 0o600)
    lines, prev = [], GENESIS_PREV
    for seq, (action, cid) in enumerate(refs.items()):
        fields = {
            "seq": seq,
            "time": f"2026-01-0{seq + 1}T00:00:00.000000+00:00",
            "actor": "dpo",
            "action": action,
            "details": {"customer": _ref(salt, cid), "region": "eu"},
            "prev": prev,
        }
        fields["hash"] = hashlib.sha256(_canon(fields)).hexdigest()
        lines.append(_canon(fields))
        prev = hashlib.sha256(lines[-1]).hexdigest()
    (state / "audit.log").write_bytes(b"".join(line + b"\n" for line in lines))
    return salt, json.loads(lines[-1])["hash"]


def test_an_old_state_folder_switches_to_the_region_key_once_and_keeps_old_entries_findable(tmp_path: Path) -> None:
    state = tmp_path / "eu"
    salt, old_head = _old_state(state, refs={"consent_withdrawn": "c-1", "export_served": "c-2"})

    log = region_audit_log(state)
    assert log.customer_ref("c-1") == _ref(_region_key(state), "c-1")  # new references: the region's key
    assert log.customer_refs("c-1") == (_ref(_region_key(state), "c-1"), _ref(salt, "c-1"))
    log.append(actor="dpo", action="export_served", details={"customer": log.customer_ref("c-1")})
    region_audit_log(state).customer_ref("c-2")  # opened again: no second migration entry

    entries = AuditLog(state / "audit.log").entries()
    assert [e.action for e in entries] == [
        "consent_withdrawn",
        "export_served",
        "customer_key_changed",
        "export_served",
    ]
    assert entries[2].actor == "fedcrm" and entries[2].details["legacy_key"] == "audit.log.salt"
    # The old head still anchors the log: the migration only appended.
    assert verify(state / "audit.log", expect_head=old_head).ok
    # c-1's entries: the old one under the salt, the new one under the region's key; none of c-2's.
    assert [(e.seq, e.action) for e in region_audit_log(state).entries_about("c-1")] == [
        (0, "consent_withdrawn"),
        (3, "export_served"),
    ]
    assert [e.seq for e in region_audit_log(state).entries_about("c-2")] == [1]


def test_an_old_state_folders_pending_erasure_is_found_under_its_old_reference(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 200}))
    ids = load_table(cfg.regions["eu"], load_schema(cfg.schema_path)).ids
    cid = str(ids[0])
    state = tmp_path / "state" / "eu"
    salt, _ = _old_state(state, refs={"policy_changed": "nobody"})
    # A request whose tombstone never came (a crash), in the old erasures/ store, under the salt's reference.
    (state / "erasures").mkdir()
    old = {
        "request_id": "erasure-20260101T000000-0000abcd",
        "region": "eu",
        "customer_ref": _ref(salt, cid),
        "shard_key": 7,
        "requested_at": "2026-01-01T00:00:00.000000+00:00",
        "requested_by": "dpo",
        "tombstoned_at": None,
        "status": "pending",
        "runs": {},
    }
    (state / "erasures" / f"{old['request_id']}.json").write_text(json.dumps(old))

    [done] = forget(state_dir=state, region="eu", customer_ids=[cid], table_ids=ids)
    assert done.request_id == old["request_id"] and done.recorded_at is not None  # completed, not duplicated
    assert [r.request_id for r in RequestStore(state, region="eu").all()] == [old["request_id"]]
    # Its audit entry, written after the switch, repeats the request's old reference: still found.
    [requested] = region_audit_log(state).entries_about(cid)
    assert requested.action == "erasure_requested" and requested.details["customer"] == _ref(salt, cid)


def test_an_old_salt_others_can_read_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "eu"
    _old_state(state, refs={"export_served": "c-1"})
    salt = state / "audit.log.salt"
    os.chmod(salt, 0o644)
    with pytest.raises(StorageError, match=r"audit\.log\.salt: the audit log's legacy salt is open to other users"):
        region_audit_log(state).customer_ref("c-1")
    os.chmod(salt, 0o600)
    salt.write_text("abc\n")
    with pytest.raises(StorageError, match="damaged"):
        region_audit_log(state).customer_ref("c-1")
    assert [e.action for e in AuditLog(state / "audit.log").entries()] == ["export_served"]  # nothing appended
