"""The server's schema cannot decide who a customer is, and the server cannot choose the accountant.

Each test plays the server: it builds a plan with ``fedcrm.fl.codec.plan_config`` from a schema it wrote
and sends it through the region's ClientApp handlers, to a region whose data owner declared their own
schema in the node settings (``schema-path``). Before 0.2.0 a region read its table with whatever
schema the plan carried: ``id: {derive: row_number, prefix: p1-}`` re-keyed every customer, so tombstones and consent
withdrawals (keyed hashes of the id) matched no one, a new prefix re-drew the hold-out, ``consent: []``
let in customers who never agreed, and a denied column could be made the label. The accountant was the
config's, so the server could move the budget's cap by about 10 %.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import REPO, write_tiny_config
from flwr.app import Context, Message, MessageType, RecordDict

from fedcrm import wire
from fedcrm.config import ExperimentConfig, load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import schema_from_text
from fedcrm.fl import client as client_module
from fedcrm.fl.codec import extend, plan_config, read_plan, to_record
from fedcrm.governance.audit_log import AuditLog
from fedcrm.models import build_model, get_weights
from fedcrm.node_settings import NodeSettings, region_settings
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.region import Region
from fedcrm.unlearning.tombstones import Tombstones

OWNER_SCHEMA = REPO / "configs" / "schemas" / "synthetic_crm.yaml"
# The re-keying id of issue 23: row numbers with a prefix of the server's choosing. The derived column is
# one the table lacks, so the id is the line number (the synthetic table carries `customer_id`).
REKEYED_ID = {"derive": "row_number", "prefix": "p1-", "derived_column": "no_such_column"}

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


def _owner_schema() -> dict[str, Any]:
    return yaml.safe_load(OWNER_SCHEMA.read_text(encoding="utf-8"))


def _region(tmp_path: Path, *, customers: int = 400, policy: str | None = None, overrides: dict | None = None):  # noqa: ANN202
    """A one-region federation: its config (the server's), and the node config its data owner wrote."""
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": customers}, overrides=overrides))
    node = {
        "region": "eu",
        "data-path": str(cfg.regions["eu"]),
        "state-dir": str(tmp_path / "state" / "eu"),
        "schema-path": str(OWNER_SCHEMA),  # the data owner's own copy of their schema
    }
    if policy is not None:
        (tmp_path / "eu-policy.yaml").write_text(policy)
        node["policy-path"] = str(tmp_path / "eu-policy.yaml")
    return cfg, node


def _train_reply(cfg: ExperimentConfig, node: dict[str, str], schema: dict[str, Any], *, run_id: str = "r1") -> Any:
    """The region's reply to a training round whose plan carries ``schema`` (the server's text)."""
    text = yaml.safe_dump(schema, sort_keys=False)
    width = len(FeatureEncoder(schema_from_text(text)).feature_names)
    weights = get_weights(build_model(cfg.model, n_features=width, seed=0))
    plan = plan_config(cfg, schema_text=text, run_id=run_id)
    content = {wire.CONFIG: extend(plan, {wire.SHARD: 0, wire.ROUND: 1}), wire.ARRAYS: to_record(weights)}
    msg = Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)  # type: ignore[arg-type]
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    return client_module.answer(client_module._train, msg, ctx)


def _outcome(reply: Any) -> tuple[str, str]:
    return str(reply[wire.STATUS][wire.OUTCOME]), str(reply[wire.STATUS][wire.REASON])


def _ledger_events(node: dict[str, str]) -> int:
    return len(PrivacyLedger.open(Path(node["state-dir"]), region="eu").events())


def _refusal_reasons(node: dict[str, str]) -> list[str]:
    log = AuditLog(Path(node["state-dir"]) / "audit.log")
    return [str(e.details["reason"]) for e in log.entries() if e.action == "refusal"]


def test_a_row_number_id_with_a_prefix_cannot_bring_a_forgotten_customer_back(tmp_path: Path) -> None:
    """Before 0.2.0 a forgotten customer was trained on again under `id: {derive: row_number, prefix: p1-}`."""
    cfg, node = _region(tmp_path)
    table = pd.read_csv(cfg.regions["eu"], dtype=str, keep_default_na=False)
    consenting = table[table["consent_churn"] == "yes"]["customer_id"]
    Tombstones(Path(node["state-dir"])).add([str(consenting.iloc[0])])  # the owner forgets a customer

    rekeyed = _owner_schema() | {"id": REKEYED_ID}
    reply = _train_reply(cfg, node, rekeyed)
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert wire.ARRAYS not in reply  # nothing trained, nothing left
    assert _ledger_events(node) == 0
    (reason,) = _refusal_reasons(node)  # the region's words name the difference, for its data owner
    assert "`id`" in reason and "p1-" in reason

    # The owner's own schema is served as always, with the forgotten customer left out.
    assert _outcome(_train_reply(cfg, node, _owner_schema())) == (wire.OUTCOME_OK, "")
    settings = NodeSettings.from_node_config(node)
    cfg_, schema, _ = read_plan(plan_config(cfg, schema_text=OWNER_SCHEMA.read_text(), run_id="r1"))
    assert str(consenting.iloc[0]) not in set(Region(settings).load(cfg_, schema).ids)


def test_an_empty_consent_list_cannot_include_customers_who_never_agreed(tmp_path: Path) -> None:
    """Before 0.2.0 `consent: []` in the plan included every customer without consent (60 of 400 here)."""
    cfg, node = _region(tmp_path)
    reply = _train_reply(cfg, node, _owner_schema() | {"consent": []})
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert _ledger_events(node) == 0
    (reason,) = _refusal_reasons(node)
    assert "`consent`" in reason and "consent_churn" in reason

    # Refused before a row is read: with the table gone the answer is the same refusal, not a failure.
    Path(node["data-path"]).rename(tmp_path / "elsewhere.csv")
    reply = _train_reply(cfg, node, _owner_schema() | {"consent": []}, run_id="r2")
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)


def test_two_prefixes_cannot_redraw_the_holdout(tmp_path: Path) -> None:
    """Before 0.2.0 every prefix drew a new hold-out: 48 of 66 customers held out (and answered about) under
    `p1-` were trained on under `p2-`, and the ledger charged them once where they paid twice."""
    cfg, node = _region(tmp_path)
    for prefix in ("p1-", "p2-"):
        reply = _train_reply(cfg, node, _owner_schema() | {"id": REKEYED_ID | {"prefix": prefix}}, run_id=prefix)
        assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert _ledger_events(node) == 0
    # Nor can the plan rename the derived-id column or the id column: each is the owner's.
    for other in ({"column": "customer_ref"}, {"derive": "row_number"}):
        reply = _train_reply(cfg, node, _owner_schema() | {"id": other}, run_id="other")
        assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)


def test_a_denied_column_cannot_be_made_the_label(tmp_path: Path) -> None:
    """Before 0.2.0 `denied_columns` was checked against the features only: the label could be any column."""
    cfg, node = _region(tmp_path, policy="denied_columns: {churn: [autopay]}\n")
    stolen = _owner_schema()
    stolen["features"] = [c for c in stolen["features"] if c["name"] != "autopay"]
    stolen["label"] = {"column": "autopay", "positive": ["yes"], "negative": ["no"]}
    reply = _train_reply(cfg, node, stolen)
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert "`label`" in _refusal_reasons(node)[0]

    # And a data owner whose policy denies their own label column for the purpose gets that refused too.
    cfg, node = _region(tmp_path / "own", policy="denied_columns: {churn: [churned]}\n")
    reply = _train_reply(cfg, node, _owner_schema())
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_COLUMN)
    assert _ledger_events(node) == 0


def test_a_feature_or_encoding_the_owner_did_not_declare_is_refused(tmp_path: Path) -> None:
    """Before 0.2.0 a region read any column the plan named as a feature, encoded as the plan said."""
    cfg, node = _region(tmp_path)
    extra = _owner_schema()
    consent_as_feature = {"name": "consent_marketing", "type": "categorical", "vocabulary": ["yes"]}
    extra["features"] = [*extra["features"], consent_as_feature]
    reply = _train_reply(cfg, node, extra)
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert "consent_marketing" in _refusal_reasons(node)[0]

    # A vocabulary of the server's choosing decides the encoding (and `unknown: error` a yes/no about a row).
    probe = copy.deepcopy(_owner_schema())
    plan_column = next(c for c in probe["features"] if c["name"] == "plan")
    plan_column |= {"vocabulary": ["basic"], "unknown": "error"}
    assert _outcome(_train_reply(cfg, node, probe)) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert _ledger_events(node) == 0

    # The run may choose among the owner's features: a subset trains, with descriptions of its own.
    subset = _owner_schema()
    subset["description"] = "the server's words"
    subset["features"] = [c | {"description": "x"} for c in subset["features"][:4]]
    assert _outcome(_train_reply(cfg, node, subset)) == (wire.OUTCOME_OK, "")


def test_a_region_without_its_own_schema_does_not_take_the_servers(tmp_path: Path) -> None:
    """Before 0.2.0 a region had no schema of its own to compare with: it took the server's text."""
    cfg, node = _region(tmp_path)
    del node["schema-path"]
    reply = _train_reply(cfg, node, _owner_schema())
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert "schema-path" in _refusal_reasons(node)[0]


def test_a_simulated_region_checks_the_configs_schema_against_its_owners_file(tmp_path: Path) -> None:
    """Before 0.2.0 `fedcrm run` gave every simulated region the config's schema: a config whose schema
    re-keyed the customers re-keyed them at every region. Each simulated owner now has a file of their own
    (`region_schemas`, else the config's `schema`), and the plan never carries it."""
    rekeyed = tmp_path / "rekeyed.yaml"
    rekeyed.write_text(yaml.safe_dump(_owner_schema() | {"id": REKEYED_ID}, sort_keys=False))
    overrides = {"schema": str(rekeyed), "region_schemas": {"eu": str(OWNER_SCHEMA)}}
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300, "us": 300}, overrides=overrides))
    nodes = region_settings(cfg, state_root=tmp_path / "state")
    assert nodes["eu"].schema_path == OWNER_SCHEMA.resolve()
    assert nodes["us"].schema_path == rekeyed.resolve()  # an owner who declared none: the config's
    plan = plan_config(cfg, schema_text=rekeyed.read_text(), run_id="r1")
    assert json.loads(str(plan[wire.EXPERIMENT]))["region_schemas"] == {}  # no owner's path goes out

    reply = _train_reply(cfg, nodes["eu"].node_config(), yaml.safe_load(rekeyed.read_text()))
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_SCHEMA)
    assert _ledger_events(nodes["eu"].node_config()) == 0


def test_the_servers_accountant_choice_does_not_move_the_regions_cap(tmp_path: Path) -> None:
    """Before 0.2.0 a region planned σ and checked its budget with the config's accountant: asking for PRV
    lowered σ by 6.8 %, and a run planned for ε = 2 under PRV spent 2.21 under the policy's RDP."""
    cfg, node = _region(tmp_path, overrides={"privacy.target_epsilon": 1.0})
    prv = cfg.with_overrides({"privacy.accountant": "prv"})
    region = Region(NodeSettings.from_node_config(node))
    assert region.noise_multiplier(prv, n=300) == region.noise_multiplier(cfg, n=300)  # the policy's (rdp)

    reply = _train_reply(prv, node, _owner_schema())
    assert _outcome(reply) == (wire.OUTCOME_REFUSED, wire.REFUSED_BY_POLICY)
    assert "accountant" in _refusal_reasons(node)[0]
    assert _ledger_events(node) == 0

    # A region whose policy chooses PRV composes its whole ledger with it, whatever the run reads.
    cfg, node = _region(tmp_path / "prv", policy="accountant: prv\n", overrides={"privacy.target_epsilon": 1.0})
    assert _outcome(_train_reply(cfg, node, _owner_schema())) == (wire.OUTCOME_REFUSED, wire.REFUSED_BY_POLICY)
    prv = cfg.with_overrides({"privacy.accountant": "prv"})
    assert _outcome(_train_reply(prv, node, _owner_schema())) == (wire.OUTCOME_OK, "")
    region = Region(NodeSettings.from_node_config(node))
    assert region.epsilon(cfg) == region.epsilon(prv) > 0  # the ledger's figure, not the run's choice
