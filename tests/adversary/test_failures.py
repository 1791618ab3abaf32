"""Free bits through failures (issue 23, item 4): a server probes a region with plans that fail only
if some property of its data holds, and reads the answer off the failure, uncharged and repeatable.

Each probe here is played through the region's ClientApp (``fedcrm.fl.client.answer``) on real files,
SQLite ledger and torch, against two tables that differ only in the probed property: the replies must
be the same. Before 0.2.0 every one of them told the two tables apart (one replied, one failed).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from region_probes import SCHEMA_TEXT, ask, edited_table, node, seen, tiny_federation

from fedcrm import wire
from fedcrm.data.io import MISSING, load_table
from fedcrm.data.schema import load_schema
from fedcrm.governance.audit_log import AuditLog

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")
# The fixed code, as the server reads it (wire.REFUSED_DATA_UNUSABLE; spelled out so the attacks replay on
# code that predates it).
UNUSABLE = "region-data-unusable"


def _blank(column: str, row: int = 0):  # noqa: ANN202
    def edit(frame):  # noqa: ANN001, ANN202
        frame.loc[row, column] = ""

    return edit


def test_probe_for_a_blank_age_gets_the_reply_of_a_table_without_one(tmp_path: Path) -> None:
    """`age` is banded for fairness only. Before: one blank age failed every message of the region
    (a free "does anyone lack an age?"); now the blank is the `(missing)` band, counted in DP answers."""
    cfg, table = tiny_federation(tmp_path, customers=300)
    with_blank = edited_table(table, tmp_path / "blank" / "eu.csv", _blank("age", row=7))
    for kind in ("describe", "train"):
        clean = seen(ask(kind, cfg, node(tmp_path, data=table, state=f"clean-{kind}")))
        probed = seen(ask(kind, cfg, node(tmp_path, data=with_blank, state=f"blank-{kind}")))
        assert probed == clean, kind
        assert clean["status/outcome"] == wire.OUTCOME_OK
    loaded = load_table(with_blank, load_schema(cfg.schema_path))
    assert loaded.sensitive["age"].iloc[7] == MISSING


def test_probe_with_unknown_error_on_a_vocabulary_is_refused_before_the_table_is_read(tmp_path: Path) -> None:
    """`unknown: error` on the plan's vocabulary asks "does anyone hold a value outside it?". Before: a
    table with one `gold` plan failed, one without trained. Now both, and a region with no table at all,
    get the same refusal: the plan alone decides it (the vocabulary and its `unknown` are the owner's; an
    owner who declares `unknown: error` gets one fixed code on every run, whichever features it uses)."""
    cfg, table = tiny_federation(tmp_path, customers=300)
    probe = SCHEMA_TEXT.replace(
        "vocabulary: [basic, standard, premium], unknown: other",
        "vocabulary: [basic, standard, premium], unknown: error",
    )
    assert probe != SCHEMA_TEXT

    def only(value: str):  # noqa: ANN202
        def edit(frame):  # noqa: ANN001, ANN202
            frame["plan"] = "standard"
            frame.loc[0, "plan"] = value

        return edit

    tables = {
        "holds gold": edited_table(table, tmp_path / "gold" / "eu.csv", only("gold")),
        "vocabulary only": edited_table(table, tmp_path / "vocab" / "eu.csv", only("basic")),
        "no table": tmp_path / "nowhere" / "eu.csv",
    }
    replies = {
        name: seen(ask("train", cfg, node(tmp_path, data=path, state=name.replace(" ", "-")), schema_text=probe))
        for name, path in tables.items()
    }
    assert replies["holds gold"] == replies["vocabulary only"] == replies["no table"]
    assert replies["no table"]["status/outcome"] == wire.OUTCOME_REFUSED


@pytest.mark.parametrize(
    "defect",
    ["label outside the spec", "duplicate id", "not a number", "no table"],
)
def test_every_data_failure_reads_as_one_fixed_code_and_its_details_stay_at_the_region(
    tmp_path: Path, defect: str
) -> None:
    """Whichever check fails, the server reads one code (`region-data-unusable`), with no digit, no
    column, no line; the data owner's audit log has the file, line and column. Before: a failure whose
    reason and outcome (`failed`, "DataError") differed from a refusal's, with the region's own words
    a step away."""
    cfg, table = tiny_federation(tmp_path, customers=300)

    def edit(frame):  # noqa: ANN001, ANN202
        if defect == "label outside the spec":
            frame.loc[3, "churned"] = "maybe"
        elif defect == "duplicate id":
            frame.loc[5, "customer_id"] = frame.loc[4, "customer_id"]
        elif defect == "not a number":
            frame.loc[2, "tenure_months"] = "n/a"

    path = tmp_path / "nowhere.csv" if defect == "no table" else edited_table(table, tmp_path / "bad" / "eu.csv", edit)
    for kind in ("describe", "train"):
        reply = seen(ask(kind, cfg, node(tmp_path, data=path, state=f"state-{kind}")))
        assert reply == {
            "status/outcome": wire.OUTCOME_REFUSED,
            "status/reason": UNUSABLE,
            "status/kind": "RegionDataUnusable",
            "records": [wire.STATUS],
        }, kind
        assert not re.search(r"\d", str(reply))
    refusals = [e for e in AuditLog(tmp_path / "state-train" / "audit.log").entries() if e.action == "refusal"]
    assert refusals and str(path) in refusals[-1].details["reason"]


def test_probe_for_an_empty_purpose_gets_the_reply_of_a_small_region(tmp_path: Path) -> None:
    """The consent column decides who may be used. Before: a region where nobody consented failed
    ("no customer can be used"), one with 30 consenting customers answered its exact 24 training
    customers. Now both read as a region below the public size step: the same declared 0 and refusal."""
    cfg, table = tiny_federation(tmp_path, customers=300)

    def consenting(n: int):  # noqa: ANN202
        def edit(frame):  # noqa: ANN001, ANN202
            frame["consent_churn"] = "no"
            frame.loc[: n - 1, "consent_churn"] = "yes"

        return edit

    empty = edited_table(table, tmp_path / "empty" / "eu.csv", consenting(0))
    small = edited_table(table, tmp_path / "small" / "eu.csv", consenting(30))
    for kind in ("describe", "train"):
        a = seen(ask(kind, cfg, node(tmp_path, data=empty, state=f"empty-{kind}")))
        b = seen(ask(kind, cfg, node(tmp_path, data=small, state=f"small-{kind}")))
        assert a == b, kind
    assert b["status/reason"] == wire.REFUSED_SHARD_SIZE


def test_probe_for_a_blank_age_in_the_holdout_gets_a_fairness_answer_of_the_same_shape(tmp_path: Path) -> None:
    """The owner declares blank ages (`missing: indicator`). Before: the evaluation answer was charged,
    then the fairness answer failed (ValueError: a value outside the bands) exactly when a hold-out
    customer lacked an age. Now `(missing)` is a band of every banded attribute: the same answer shape,
    a blank or not."""
    from region_probes import owner_region

    from fedcrm.fl.codec import plan_config, read_plan
    from fedcrm.models import build_model, get_weights

    cfg, table = tiny_federation(tmp_path, customers=300)
    text = SCHEMA_TEXT.replace(
        "{name: age, type: numeric, min: 18, max: 95}",
        "{name: age, type: numeric, min: 18, max: 95, missing: indicator}",
    )
    assert text != SCHEMA_TEXT
    owners = tmp_path / "owner-schema.yaml"  # the owner's own declaration: blank ages are expected
    owners.write_text(text)
    plan_cfg, schema, run_id = read_plan(plan_config(cfg, schema_text=text, run_id="probe"))
    owner = owner_region(node(tmp_path, data=table, state="look", schema=str(owners)))
    data = owner.load(plan_cfg, schema)
    held_out = str(data.ids[data.holdout][0])  # a hold-out customer

    def blank_age(frame):  # noqa: ANN001, ANN202
        frame.loc[frame["customer_id"] == held_out, "age"] = ""

    with_blank = edited_table(table, tmp_path / "blank" / "eu.csv", blank_age)
    weights = get_weights(build_model(cfg.model, n_features=data.x.shape[1], seed=0))
    shapes = {}
    for name, path in (("clean", table), ("blank", with_blank)):
        region = owner_region(node(tmp_path, data=path, state="look", schema=str(owners)))  # same hold-out
        trust = region.trust_summary(plan_cfg, schema, constituents=[weights], run_id=run_id)
        shapes[name] = {k: np.shape(v) for k, v in trust.to_metrics(schema=schema).items()}
    assert shapes["blank"] == shapes["clean"]


def test_probe_by_choosing_features_gets_the_same_reply_with_or_without_a_blank_feature(tmp_path: Path) -> None:
    """A run chooses among the owner's features. `tenure_months` allows no blank (`missing: error`) and
    one customer has one. Before: a run choosing it failed and a run leaving it out trained, so two runs
    told whether the column held a blank. Now the table is checked under every declared feature: both
    runs read `region-data-unusable`."""
    cfg, table = tiny_federation(tmp_path, customers=300)
    tenure = "  - {name: tenure_months, type: numeric, min: 0, max: 120, description: months as a customer}\n"
    assert tenure in SCHEMA_TEXT
    without = SCHEMA_TEXT.replace(tenure, "")
    with_blank = edited_table(table, tmp_path / "blank" / "eu.csv", _blank("tenure_months", row=11))
    replies = {
        name: seen(ask("train", cfg, node(tmp_path, data=with_blank, state=name), schema_text=text))
        for name, text in (("all features", SCHEMA_TEXT), ("without tenure", without))
    }
    assert replies["all features"] == replies["without tenure"]
    assert replies["without tenure"]["status/reason"] == UNUSABLE
