"""Consent per purpose, the customer export and `audit verify`, at one region (no federation needed).

Expected values come from the table read with pandas and from the model's weights in numpy, not from
the export code; the export must also validate against the published JSON Schema.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.config import ExperimentConfig, load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import Schema, load_schema
from fedcrm.errors import PrivacyBudgetError
from fedcrm.governance.audit_log import AuditLog, verify
from fedcrm.governance.audit_trail import region_audit_log
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.request_store import RequestStore
from fedcrm.models import build_model, get_weights
from fedcrm.region import NodeSettings, Region
from fedcrm.run_summary import RunSummary
from fedcrm.runs import RunDir
from fedcrm.unlearning.shards import holdout_mask, region_secret, shard_of
from fedcrm.unlearning.tombstones import Tombstones

EXPORT_SCHEMA = json.loads((REPO / "schemas" / "export-v1.schema.json").read_text())
RECEIPT_SCHEMA = json.loads((REPO / "schemas" / "receipt-v1.schema.json").read_text())
runner = CliRunner()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ExperimentConfig, Schema, Path]:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300, "us": 200}))
    return cfg, load_schema(cfg.schema_path), tmp_path / "state"


def _table(cfg: ExperimentConfig, region: str = "eu") -> pd.DataFrame:
    return pd.read_csv(cfg.regions[region], dtype=str, keep_default_na=False)


def _region(cfg: ExperimentConfig, state: Path, region: str = "eu", policy: Path | None = None) -> Region:
    return Region(
        NodeSettings(
            region=region,
            data_path=cfg.regions[region],
            state_dir=state / region,
            policy_path=policy,
            schema_path=cfg.schema_path,
        )
    )


def _fake_run(tmp_path: Path, cfg: ExperimentConfig, *, name: str, kind: str, shards: int = 1) -> Path:
    """A finished run folder with a served model of random weights (training is not what is tested)."""
    cfg = cfg.with_overrides({"model.kind": kind, "model.hidden": [8], "unlearning.shards": shards, "name": name})
    run = tmp_path / name
    rd = RunDir.create(run, cfg)
    names = FeatureEncoder(load_schema(cfg.schema_path)).feature_names
    constituents = {k: get_weights(build_model(cfg.model, n_features=len(names), seed=10 + k)) for k in range(shards)}
    rd.save_model(constituents=constituents, feature_names=names, version=3)
    rd.write_summary(
        RunSummary(
            name=name,
            run_id=f"{name}-0001",
            task=cfg.task,
            privacy_mode="sample_dp",
            final_metrics={},
            privacy={},
            regions={},
            warnings=[],
            config_sha256=cfg.digest(),
            code_version="test",
            wall_time_s=0.0,
        )
    )
    return run


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    crashed = result.exception is not None and result.exit_code not in (0, 1, 2)
    return result.exit_code, result.output + (repr(result.exception) if crashed else "")


# --- consent -------------------------------------------------------------------------------------


def test_withdrawn_consent_excludes_the_customer_from_that_purpose_only(setup) -> None:
    cfg, schema, state = setup
    df = _table(cfg)
    cid = df[(df.consent_churn == "yes") & (df.consent_marketing == "yes")].customer_id.iloc[0]
    before = _region(cfg, state).load(cfg, schema)
    assert cid in set(before.ids)
    assert before.counts["excluded_no_consent"] == int((df.consent_churn != "yes").sum())

    code, out = _invoke(
        "consent",
        "withdraw",
        "--region",
        "eu",
        "--customer-id",
        cid,
        "--purpose",
        "churn",
        "--state",
        str(state),
        "--operator",
        "dpo-anna",
    )
    assert code == 0, out

    after = _region(cfg, state).load(cfg, schema)
    assert cid not in set(after.ids)
    assert len(after.ids) == len(before.ids) - 1
    assert after.counts["excluded_no_consent"] == before.counts["excluded_no_consent"] + 1
    # Propensity training still uses them: the withdrawal was for churn only.
    propensity = cfg.with_overrides({"task": "propensity"})
    assert cid in set(_region(cfg, state).load(propensity, schema).ids)

    # Asked twice: a clear refusal, nothing added.
    code, out = _invoke(
        "consent", "withdraw", "--region", "eu", "--customer-id", cid, "--purpose", "churn", "--state", str(state)
    )
    assert code == 2 and "already withdrew" in out
    entries = AuditLog(state / "eu" / "audit.log").entries()
    withdrawn = [e for e in entries if e.action == "consent_withdrawn"]
    assert len(withdrawn) == 1 and withdrawn[0].actor == "dpo-anna"
    assert withdrawn[0].details["customer"] == region_audit_log(state / "eu").customer_ref(cid)
    assert cid not in (state / "eu" / "audit.log").read_text()
    receipts = list((state / "eu" / "receipts").glob("*.json"))
    assert len(receipts) == 1 and cid not in receipts[0].read_text()


def test_consent_withdrawal_marks_only_the_constituent_that_trained_on_them_stale(setup, tmp_path: Path) -> None:
    cfg, _, state = setup
    run = _fake_run(tmp_path, cfg, name="sharded", kind="logistic", shards=4)
    df = _table(cfg)
    # The hold-out is the region's: keyed by its secret, at its policy's fraction.
    held = holdout_mask(
        df.customer_id.to_numpy(dtype=object),
        fraction=_region(cfg, state).policy.holdout_fraction,
        secret=region_secret(state / "eu"),
    )
    trained = df[~held & (df.consent_churn == "yes")].customer_id.iloc[0]
    held_out = df[held & (df.consent_churn == "yes")].customer_id.iloc[0]
    never = df[~held & (df.consent_churn != "yes")].customer_id.iloc[0]
    for cid in (trained, held_out, never):
        code, out = _invoke(
            "consent",
            "withdraw",
            "--region",
            "eu",
            "--customer-id",
            cid,
            "--purpose",
            "churn",
            "--state",
            str(state),
            "--run",
            str(run),
        )
        assert code == 0, out
    requests = RequestStore(state / "eu", region="eu").all(kind="consent_withdrawal")
    receipts = {
        r.request_id: json.loads((state / "eu" / "receipts" / f"{r.request_id}.json").read_text()) for r in requests
    }
    assert len(list((state / "eu" / "receipts").glob("*.json"))) == 3
    for receipt in receipts.values():
        jsonschema.validate(receipt, RECEIPT_SCHEMA)
    expected = int(shard_of(np.asarray([trained], dtype=object), shards=4, secret=region_secret(state / "eu"))[0])
    by_shard = {r["runs"][0]["shard"]: r for r in receipts.values()}
    assert set(by_shard) == {expected, None}
    served = by_shard[expected]
    # Served at once by exclusion: version 3 -> 4 serves the other three constituents.
    assert served["status"] == "excluded" and served["purpose"] == "churn"
    assert served["runs"][0]["served_by"] == "exclusion" and served["runs"][0]["excluded_at_version"] == 4
    assert json.loads((run / "model" / "model.json").read_text())["shards"] == sorted({0, 1, 2, 3} - {expected})
    assert not (run / "model" / f"constituent-{expected}.npz").exists()
    assert sorted(r["runs"][0]["status"] for r in receipts.values() if r is not served) == ["not_trained"] * 2
    marker = json.loads((run / "erasure_pending.json").read_text())  # the erasure machinery's stale marker
    assert marker["stale"] == [{"region": "eu", "request_id": served["request_id"], "shard": expected}]


def test_a_changed_consent_column_on_reimport_is_honoured(setup) -> None:
    cfg, schema, state = setup
    df = _table(cfg)
    granted = df.index[df.consent_churn == "yes"]
    flipped = df.customer_id[granted[:5]].tolist()
    assert set(flipped) <= set(_region(cfg, state).load(cfg, schema).ids)
    df.loc[granted[:5], "consent_churn"] = "no"
    df.to_csv(cfg.regions["eu"], index=False)  # the CRM re-exported the table
    data = _region(cfg, state).load(cfg, schema)
    assert not set(flipped) & set(data.ids)
    assert data.counts["excluded_no_consent"] == int((df.consent_churn != "yes").sum())
    assert data.counts["train"] + data.counts["holdout"] == int((df.consent_churn == "yes").sum())


def test_unknown_purpose_and_forgotten_customer_are_refused(setup) -> None:
    cfg, _, state = setup
    cid = _table(cfg).customer_id.iloc[0]
    code, out = _invoke(
        "consent", "withdraw", "--region", "eu", "--customer-id", cid, "--purpose", "spam", "--state", str(state)
    )
    assert code == 2 and "--purpose must be one of" in out
    Tombstones(state / "eu").add([cid])
    code, out = _invoke(
        "consent", "withdraw", "--region", "eu", "--customer-id", cid, "--purpose", "churn", "--state", str(state)
    )
    assert code == 2 and "already forgotten" in out
    assert not ConsentWithdrawals(state / "eu").contains(cid, purpose="churn")


# --- export --------------------------------------------------------------------------------------


def _export(cfg: ExperimentConfig, state: Path, cid: str, out: Path, *runs: Path, fmt: str = "json") -> tuple[int, str]:
    args = [
        "export",
        "--region",
        "eu",
        "--customer-id",
        cid,
        "--data",
        str(cfg.regions["eu"]),
        "--schema",
        str(cfg.schema_path),
        "--out",
        str(out),
        "--state",
        str(state),
        "--format",
        fmt,
        "--operator",
        "dpo-anna",
    ]
    for r in runs:
        args += ["--run", str(r)]
    return _invoke(*args)


def test_export_validates_against_its_schema_and_holds_the_right_values(setup, tmp_path: Path) -> None:
    cfg, schema, state = setup
    logistic = _fake_run(tmp_path, cfg, name="logit", kind="logistic", shards=1)
    mlp = _fake_run(tmp_path, cfg, name="mlp", kind="mlp", shards=2)
    df = _table(cfg)
    # A held-out customer: the export must find them in the region's keyed hold-out (a wrong key or
    # fraction would miss them four times in five).
    fraction = _region(cfg, state).policy.holdout_fraction
    held = holdout_mask(df.customer_id.to_numpy(dtype=object), fraction=fraction, secret=region_secret(state / "eu"))
    row = df[(df.consent_marketing == "no") & held].iloc[0]
    cid = row.customer_id
    _invoke("consent", "withdraw", "--region", "eu", "--customer-id", cid, "--purpose", "churn", "--state", str(state))
    out = tmp_path / "export.json"
    code, text = _export(cfg, state, cid, out, logistic, mlp)
    assert code == 0, text
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, EXPORT_SCHEMA)

    assert doc["customer_id"] == cid and doc["region"] == "eu"
    assert doc["record"]["columns"] == {c: row[c] for c in schema.columns_read()}
    table = load_table(cfg.regions["eu"], schema)
    encoder = FeatureEncoder(schema)
    x = encoder.encode(table)[list(table.ids).index(cid)]
    assert [f["name"] for f in doc["features"]] == encoder.feature_names
    assert np.allclose([f["value"] for f in doc["features"]], x)
    consent = {c["purpose"]: c for c in doc["consent"]}
    assert consent["churn"] == {
        "purpose": "churn",
        "column": "consent_churn",
        "in_table": row.consent_churn == "yes",
        "withdrawn": True,
        "effective": False,
    }
    assert consent["propensity"]["in_table"] is False and consent["propensity"]["effective"] is False

    lm, mm = doc["models"]
    ids = np.asarray([cid], dtype=object)
    assert lm["in_holdout"] is True
    assert lm["trained_on_their_data"] is False  # consent to churn withdrawn
    assert mm["shard"] == int(shard_of(ids, shards=2, secret=region_secret(state / "eu"))[0])
    assert lm["run_id"] == "logit-0001" and lm["model_version"] == 3
    # Logistic: the score is sigmoid(w·x + b), and the contributions are exactly w_i * x_i.
    w = np.load(logistic / "model" / "constituent-0.npz")
    logit = float(w["out.weight"][0].astype(np.float64) @ x + w["out.bias"][0])
    assert lm["score"] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
    contrib = {c["feature"]: c["contribution"] for c in lm["explanation"]["contributions"]}
    for j, name in enumerate(encoder.feature_names):
        assert contrib[name] == pytest.approx(float(w["out.weight"][0][j]) * float(x[j]), abs=1e-6)
    assert lm["explanation"]["baseline"] + sum(contrib.values()) == pytest.approx(logit, abs=1e-5)
    # MLP ensemble: the served score is the mean of the constituents' probabilities, computed in numpy here.
    probs = []
    for k in range(2):
        p = np.load(mlp / "model" / f"constituent-{k}.npz")
        h = np.maximum(p["hidden0.weight"] @ x + p["hidden0.bias"], 0)
        probs.append(1 / (1 + np.exp(-(p["out.weight"][0] @ h + p["out.bias"][0]))))
    assert mm["constituent_scores"] == pytest.approx(probs, abs=1e-6)
    assert mm["score"] == pytest.approx(np.mean(probs), abs=1e-6)
    # History: the withdrawal, under the customer's keyed hash.
    assert [h["action"] for h in doc["history"]] == ["consent_withdrawn"]
    assert doc["history"][0]["details"]["customer"] == doc["customer_ref"]

    log = state / "eu" / "audit.log"
    served = [e for e in AuditLog(log).entries() if e.action == "export_served"]
    assert len(served) == 1 and served[0].actor == "dpo-anna"
    assert cid not in log.read_text()

    csv_out = tmp_path / "export.csv"
    code, text = _export(cfg, state, cid, csv_out, logistic, fmt="csv")
    assert code == 0, text
    flat = pd.read_csv(csv_out, dtype=str, keep_default_na=False).set_index("field")["value"]
    assert flat["customer_id"] == cid and flat["consent[0].withdrawn"] == "true"
    assert float(flat["models[0].score"]) == pytest.approx(lm["score"])


def test_export_of_unknown_or_forgotten_customer_is_an_error_and_writes_nothing(setup, tmp_path: Path) -> None:
    cfg, _, state = setup
    out = tmp_path / "nobody.json"
    code, text = _export(cfg, state, "eu-9999999", out)
    assert code == 2 and "no customer with id 'eu-9999999'" in text
    assert not out.exists()

    cid = _table(cfg).customer_id.iloc[0]
    Tombstones(state / "eu").add([cid])
    code, text = _export(cfg, state, cid, out)
    assert code == 2 and "was forgotten" in text
    assert not out.exists()
    refused = [e for e in AuditLog(state / "eu" / "audit.log").entries() if e.action == "export_requested"]
    assert [e.details["outcome"] for e in refused] == ["refused", "refused"]


# --- audit ---------------------------------------------------------------------------------------


def test_audit_verify_cli_passes_a_clean_log_and_names_the_altered_line(setup) -> None:
    cfg, _, state = setup
    region = _region(cfg, state)  # records the policy in force
    log = region.audit.path
    for i in range(3):
        region.audit.append(actor="dpo-anna", action="export_served", details={"n": i})
    code, out = _invoke("audit", "verify", str(log))
    assert code == 0 and out.startswith("OK") and "4 entries" in out

    lines = log.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"n":1', b'"n":7')
    log.write_bytes(b"".join(lines))
    code, out = _invoke("audit", "verify", str(log))
    assert code == 1 and "line 3" in out and "altered" in out

    code, out = _invoke("audit", "verify", str(log.parent / "missing.log"))
    assert code == 2


def test_policy_changes_and_refusals_are_audited_at_the_region(setup, tmp_path: Path) -> None:
    cfg, schema, state = setup
    _region(cfg, state)
    _region(cfg, state)  # same (default) policy: nothing new
    policy = tmp_path / "eu-policy.yaml"
    policy.write_text("privacy_budget: 0.5\nmin_customers: 20\n")
    region = _region(cfg, state, policy=policy)
    changes = [e for e in region.audit.entries() if e.action == "policy_changed"]
    assert len(changes) == 2
    assert changes[1].details["file_sha256"] == __import__("hashlib").sha256(policy.read_bytes()).hexdigest()

    init = get_weights(build_model(cfg.model, n_features=FeatureEncoder(schema).n_features, seed=0))
    with pytest.raises(PrivacyBudgetError):
        region.train(cfg, schema, weights=init, shard=0, round_=1, run_id="r-1")
    refusals = [e for e in region.audit.entries() if e.action == "refusal"]
    assert len(refusals) == 1
    assert refusals[0].details["kind"] == "PrivacyBudgetError" and refusals[0].details["run_id"] == "r-1"
    assert refusals[0].actor == "region:eu"
    assert verify(region.audit.path).ok
