"""A refusal crosses the wire as a fixed code; its words (with exact counts) stay in the region's audit log."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_tiny_config
from flwr.app import RecordDict

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.errors import PolicyError, PrivacyBudgetError


def _context(tmp_path: Path, *, policy: Path | None):  # noqa: ANN202
    from flwr.app import Context, RecordDict

    node_config = {
        "region": "eu",
        "data-path": str(tmp_path / "data" / "eu.csv"),
        "state-dir": str(tmp_path / "st"),
        "schema-path": str(REPO / "configs" / "schemas" / "synthetic_crm.yaml"),  # the data owner's copy
    }
    if policy is not None:
        node_config["policy-path"] = str(policy)
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _train_message(cfg_path: Path):  # noqa: ANN202
    from flwr.app import Message, MessageType, RecordDict

    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.schema import load_schema
    from fedcrm.fl.codec import extend, plan_config, to_record
    from fedcrm.models import build_model, get_weights

    cfg = load_config(cfg_path)
    schema = load_schema(cfg.schema_path)
    model = build_model(cfg.model, n_features=len(FeatureEncoder(schema).feature_names), seed=0)
    plan = plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id="r1")
    content = {wire.CONFIG: extend(plan, {wire.SHARD: 0, wire.ROUND: 1}), wire.ARRAYS: to_record(get_weights(model))}
    return Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)  # type: ignore[arg-type]


def _refused_training(tmp_path: Path, *, policy: str) -> RecordDict:
    """The reply of a one-region node whose policy (``policy``, YAML) refuses a training round."""
    from fedcrm.fl import client as client_module

    cfg_path = write_tiny_config(tmp_path, regions={"eu": 300})
    policy_path = tmp_path / "eu-policy.yaml"
    policy_path.write_text(policy)
    return client_module.answer(client_module._train, _train_message(cfg_path), _context(tmp_path, policy=policy_path))


@pytest.mark.usefixtures("task_identity")
def test_a_shard_below_the_minimum_is_refused_with_a_code_and_no_count_leaves(tmp_path: Path) -> None:
    """Old code sent "shard 0 has 225 training customers, fewer than the policy's minimum 100000"."""
    from fedcrm.governance.audit_log import AuditLog

    reply = _refused_training(tmp_path, policy="min_customers: 100000\n")
    st = reply[wire.STATUS]
    assert st[wire.OUTCOME] == wire.OUTCOME_REFUSED
    assert st[wire.REASON] == wire.REFUSED_SHARD_SIZE
    assert set(reply.keys()) == {wire.STATUS}
    assert not re.search(r"\d", "".join(str(v) for v in st.values())), dict(st)  # no count of any kind
    refusals = [e for e in AuditLog(tmp_path / "st" / "audit.log").entries() if e.action == "refusal"]
    assert len(refusals) == 1
    detail = refusals[0].details["reason"]
    assert "training customers" in detail and "100000" in detail  # the words stay with the region


@pytest.mark.usefixtures("task_identity")
def test_a_purpose_refusal_names_only_its_code(tmp_path: Path) -> None:
    reply = _refused_training(tmp_path, policy="allowed_purposes: [propensity]\n")
    assert reply[wire.STATUS][wire.REASON] == wire.REFUSED_PURPOSE
    assert "propensity" not in str(reply)  # nor what the policy does allow


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PolicyError("x"), wire.REFUSED_BY_POLICY),
        (PolicyError("x", code=wire.REFUSED_COLUMN), wire.REFUSED_COLUMN),
        (PrivacyBudgetError("ε 3.2 over 3.0"), wire.REFUSED_BUDGET),
    ],
)
def test_every_refusal_carries_a_code_from_the_wire_vocabulary(error: PolicyError, code: str) -> None:
    assert error.code == code and error.code in wire.REFUSAL_CODES


def test_a_code_outside_the_wire_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="refusal code must be one of"):
        PolicyError("x", code="shard has 17 customers")


def test_the_codes_carry_no_digits() -> None:
    assert all(not re.search(r"\d", c) for c in wire.REFUSAL_CODES)
    assert np.all([c == c.lower() for c in wire.REFUSAL_CODES])
