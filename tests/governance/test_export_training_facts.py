"""The export's training facts hold while a withdrawal or an erasure awaits its retrain: the served model
of a one-constituent run still holds what it learnt from the customer, so ``trained_on_their_data`` is
true (it once read today's consent and said false) and ``awaiting_request`` names the request; a run
whose constituent was excluded at once no longer serves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import write_tiny_config
from test_data_owner_rights import EXPORT_SCHEMA, _export, _fake_run, _invoke, _region, _table

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.governance.request_store import RequestStore
from fedcrm.unlearning.shards import holdout_mask, region_secret


@pytest.fixture
def owner(tmp_path: Path) -> tuple[ExperimentConfig, Path]:
    return load_config(write_tiny_config(tmp_path, regions={"eu": 300, "us": 200})), tmp_path / "state"


def _trained_customer(cfg: ExperimentConfig, state: Path) -> str:
    """A customer of eu who consented to churn and is not held out: every churn run trains on them."""
    df = _table(cfg)
    held = holdout_mask(
        df.customer_id.to_numpy(dtype=object),
        fraction=_region(cfg, state).policy.holdout_fraction,
        secret=region_secret(state / "eu"),
    )
    return str(df[~held & (df.consent_churn == "yes")].customer_id.iloc[0])


def test_a_withdrawal_awaiting_its_retrain_reads_trained_on_their_data(owner, tmp_path: Path) -> None:  # noqa: ANN001
    cfg, state = owner
    single = _fake_run(tmp_path, cfg, name="single", kind="logistic", shards=1)  # nothing to exclude: a retrain
    sharded = _fake_run(tmp_path, cfg, name="sharded", kind="logistic", shards=2)  # excluded at once
    cid = _trained_customer(cfg, state)
    args = ["consent", "withdraw", "--region", "eu", "--customer-id", cid, "--purpose", "churn"]
    code, text = _invoke(*args, "--state", str(state), "--run", str(single), "--run", str(sharded))
    assert code == 0, text
    (request,) = RequestStore(state / "eu", region="eu").all(kind="consent_withdrawal")

    out = tmp_path / "export.json"
    code, text = _export(cfg, state, cid, out, single, sharded)
    assert code == 0, text
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, EXPORT_SCHEMA)
    one, two = doc["models"]
    assert one["consent_for_task"] is False  # today's consent: withdrawn
    assert one["trained_on_their_data"] is True and one["awaiting_request"] == request.request_id
    assert two["trained_on_their_data"] is False and two["awaiting_request"] is None


def test_a_forgotten_customer_is_told_which_served_model_still_holds_their_data(owner, tmp_path: Path) -> None:  # noqa: ANN001
    cfg, state = owner
    single = _fake_run(tmp_path, cfg, name="single", kind="logistic", shards=1)
    cid = _trained_customer(cfg, state)
    code, text = _invoke("forget", "--region", "eu", "--customer-id", cid, "--run", str(single), "--state", str(state))
    assert code == 0, text
    code, text = _export(cfg, state, cid, tmp_path / "export.json", single)
    assert code == 2 and "was forgotten" in text
    assert "the served model of run(s) single still holds" in " ".join(text.split()), text
