"""A real (tiny) Flower simulation writes the audit trail the data owners and the server rely on.

Two synthetic regions, two rounds: the server's log holds the run with its config hash, every region's
log holds its policy and its privacy spend per round matching the ledger, served requests are logged
under salted hashes, and no customer id appears in clear in any audit log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.config import load_config
from fedcrm.fl.codec import plan_config, read_plan
from fedcrm.fl.simulation import run_simulated
from fedcrm.governance.audit_log import AuditLog
from fedcrm.governance.policy import load_policy
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, MECHANISM_GAUSSIAN, PrivacyLedger

runner = CliRunner()


def test_a_simulated_run_leaves_a_verifiable_audit_trail_without_customer_ids(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path))
    state, run_dir = tmp_path / "state", tmp_path / "run"
    tables = {r: pd.read_csv(p, dtype=str, keep_default_na=False) for r, p in cfg.regions.items()}
    eu = tables["eu"]
    withdrawn = eu[eu.consent_churn == "yes"].customer_id.iloc[0]
    result = runner.invoke(
        app,
        [
            "consent",
            "withdraw",
            "--region",
            "eu",
            "--customer-id",
            withdrawn,
            "--purpose",
            "churn",
            "--state",
            str(state),
            "--operator",
            "dpo-anna",
        ],
    )
    assert result.exit_code == 0, result.output

    summary = run_simulated(cfg, run_dir=run_dir, state_root=state, report=lambda s: None)

    # Consent exclusions, withdrawal included, are counted exactly in the region's own pre-flight entry;
    # the server only learns the declared (rounded) training size, so a withdrawal cannot be read off it.
    # A region hashes the plan it was sent (no paths, no server-side settings), not the server's file.
    plan = plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id=summary.run_id)
    plan_digest = read_plan(plan)[0].digest()
    for region, df in tables.items():
        refused = int((df.consent_churn != "yes").sum()) + (1 if region == "eu" else 0)
        preflight = [e for e in AuditLog(state / region / "audit.log").entries() if e.action == "preflight"]
        assert preflight and {e.details["config_sha256"] for e in preflight} == {plan_digest}
        counts = preflight[-1].details["counts"]
        assert counts["excluded_no_consent"] == refused
        assert counts["train"] + counts["holdout"] == len(df) - refused
        assert summary.regions[region] == {"train": float(load_policy(None).declared_size(counts["train"]))}

    server = AuditLog(run_dir / "audit.log").entries()
    assert [e.action for e in server] == ["run_started", "run_finished"]
    assert {e.actor for e in server} == {"server"}
    assert server[0].details["config_sha256"] == cfg.digest() == summary.config_sha256
    assert server[1].details["run_id"] == summary.run_id

    for region in cfg.regions:
        entries = AuditLog(state / region / "audit.log").entries()
        assert not [e for e in entries if e.action == "refusal"]
        assert [e.action for e in entries if e.action == "policy_changed"] == ["policy_changed"]
        spent = [e for e in entries if e.action == "privacy_spent"]
        assert all(e.actor == f"region:{region}" and e.details["run_id"] == summary.run_id for e in spent)
        # Every release in the ledger, training rounds and evaluation answers alike, is in the audit log.
        events = PrivacyLedger.open(state / region, region=region).events()
        assert [e.details["ledger_event"] for e in spent] == [ev.id for ev in events]
        mechanism = {ev.id: ev.mechanism for ev in events}
        rounds = [e.details["round"] for e in spent if mechanism[e.details["ledger_event"]] == MECHANISM_DP_SGD]
        assert rounds == [1, 2]
        assert {mechanism[e.details["ledger_event"]] for e in spent} == {MECHANISM_DP_SGD, MECHANISM_GAUSSIAN}
        assert spent[-1].details["epsilon_spent_total"] == pytest.approx(summary.privacy[region]["epsilon"])

    out = tmp_path / "export.json"
    customer = eu[(eu.consent_churn == "yes") & (eu.customer_id != withdrawn)].customer_id.iloc[0]
    result = runner.invoke(
        app,
        [
            "export",
            "--region",
            "eu",
            "--customer-id",
            customer,
            "--data",
            str(cfg.regions["eu"]),
            "--schema",
            str(cfg.schema_path),
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--state",
            str(state),
        ],
    )
    assert result.exit_code == 0, result.output
    model = json.loads(out.read_text())["models"][0]
    assert model["run_id"] == summary.run_id and model["trained_on_their_data"] == (not model["in_holdout"])

    logs = [run_dir / "audit.log", *(state / r / "audit.log" for r in cfg.regions)]
    text = "\n".join(p.read_text() for p in logs)
    leaked = [cid for df in tables.values() for cid in df.customer_id if cid in text]
    assert not leaked, f"customer ids in clear in an audit log: {leaked[:5]}"
    for p in logs:
        result = runner.invoke(app, ["audit", "verify", str(p)])
        assert result.exit_code == 0 and result.output.startswith("OK"), result.output
