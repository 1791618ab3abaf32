"""The server's messages themselves: anything outside the wire vocabulary is refused before a row is read.

Each attack sends a region a message that today's vocabulary (fedcrm/wire.py: ``REQUEST_RECORDS``,
``PLAN_KEYS``) does not allow, through the ClientApp's ``answer``, on a real table that the region would
otherwise train on; fedcrm before 0.2.0 ignored the extra record or key and trained (or failed with the
exception's name after the table was read). The last test holds README's table of server inputs to the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from region_probes import SCHEMA_TEXT, ask, node, owner_region, tiny_federation

from fedcrm import wire
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import schema_from_text
from fedcrm.fl import client
from fedcrm.fl.codec import extend, plan_config, to_record
from fedcrm.models import build_model, get_weights

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


def _train_message(cfg: Any, *, extra_config: dict[str, Any] | None = None, run_id: str = "probe") -> RecordDict:
    plan = plan_config(cfg, schema_text=SCHEMA_TEXT, run_id=run_id)
    model = build_model(
        cfg.model, n_features=FeatureEncoder(schema_from_text(SCHEMA_TEXT, source="t")).n_features, seed=0
    )
    return RecordDict(
        {
            wire.CONFIG: extend(plan, {wire.SHARD: 0, wire.ROUND: 1, **(extra_config or {})}),
            wire.ARRAYS: to_record(get_weights(model)),
        }
    )


def _answer(content: RecordDict, context: Any) -> RecordDict:
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    return client.answer(client._train, msg, context)


def _refused_before_anything(reply: RecordDict, context: Any) -> None:
    status = reply[wire.STATUS]
    assert (status[wire.OUTCOME], status[wire.REASON]) == (wire.OUTCOME_REFUSED, wire.REFUSED_MESSAGE), dict(status)
    assert wire.ARRAYS not in reply
    assert owner_region(context).ledger.events() == [], "a refused message was charged"


@pytest.fixture
def region(tmp_path: Path) -> tuple[Any, Any]:
    cfg, table = tiny_federation(tmp_path, customers=400)
    context = node(tmp_path, data=table)
    assert ask("train", cfg, context)[wire.STATUS][wire.OUTCOME] == wire.OUTCOME_OK  # the same plan, well formed
    return cfg, node(tmp_path, data=table, state="fresh-state")


def test_a_config_key_outside_the_vocabulary_is_refused_before_a_row_is_read(region: tuple[Any, Any]) -> None:
    cfg, context = region
    _refused_before_anything(_answer(_train_message(cfg, extra_config={"holdout-seed": 7}), context), context)


def test_a_record_outside_the_vocabulary_is_refused(region: tuple[Any, Any]) -> None:
    cfg, context = region
    content = _train_message(cfg)
    content["hint"] = ConfigRecord({"customer": "c-17"})
    _refused_before_anything(_answer(content, context), context)


@pytest.mark.parametrize("run_id", ["x" * 10_000, "run\n1", ""])
def test_a_run_id_that_is_not_a_short_printable_label_is_refused(region: tuple[Any, Any], run_id: str) -> None:
    cfg, context = region
    _refused_before_anything(_answer(_train_message(cfg, run_id=run_id), context), context)


@pytest.mark.parametrize("extra", [{wire.SHARD: 3}, {wire.SHARD: -1}, {wire.ROUND: 1.5}, {wire.ACTION: "dump"}])
def test_a_shard_round_or_action_outside_its_shape_is_refused(region: tuple[Any, Any], extra: dict) -> None:
    """Shard 3 of a one-shard run: fedcrm before 0.2.0 read the table, then failed on the ledger's check."""
    cfg, context = region
    _refused_before_anything(_answer(_train_message(cfg, extra_config=extra), context), context)


# -- README's table of what the server sends -------------------------------------------------------------

NOT_ON_THE_WIRE = ("timing", "bundle")  # inputs that are not message fields: named by a word in the table


def _plan_fields(cfg: Any) -> set[str]:
    """Every field of the plan's ``experiment`` as the server sends it, as a dotted path."""

    def leaves(mapping: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in mapping.items():
            if isinstance(value, dict) and value and prefix + key not in ("regions", "policies"):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(prefix + key)
        return out

    import json

    return leaves(json.loads(str(plan_config(cfg, schema_text=SCHEMA_TEXT, run_id="r")[wire.EXPERIMENT])))


def _table_names() -> tuple[set[str], str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("#### What the server sends, and what bounds it\n", 1)[1].split("\n\n- ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| What")]
    first_cells = [row.split(" | ", 1)[0] for row in rows]
    return {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}, "\n".join(first_cells)


def test_readmes_table_names_every_record_key_and_plan_field_the_server_sends(tmp_path: Path) -> None:
    cfg, _ = tiny_federation(tmp_path, customers=100)
    names, cells = _table_names()
    wildcards = {n.removesuffix(".*") for n in names if n.endswith(".*")}
    sent = set(wire.REQUEST_RECORDS) | set(wire.PLAN_KEYS) | _plan_fields(cfg)
    unnamed = sorted(f for f in sent if f not in names and f.split(".", 1)[0] not in wildcards)
    assert not unnamed, f"README's table of what the server sends does not name {unnamed}"
    assert all(word in cells for word in NOT_ON_THE_WIRE)
    known = sent | {f"{w}.*" for w in wildcards}
    stale = sorted(n for n in names if n not in known)
    assert not stale, f"README's table names {stale}, which the server does not send"
