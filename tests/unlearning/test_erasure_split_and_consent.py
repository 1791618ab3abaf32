"""A run made from a `split:` config (the region files live in the run folder), served for one erasure
and one consent withdrawal by the same retrain: the forgotten customer's row leaves the run folder, both
requests get receipts, and the retrained model no longer uses either customer.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_tiny_config

from fedcrm.commands.unlearning import forget_customers, retrain_run
from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.data.synthetic import generate
from fedcrm.experiment import materialise_regions
from fedcrm.fl.simulation import run_simulated
from fedcrm.governance.requests import withdraw_consent
from fedcrm.unlearning.retrain import run_view


def test_forget_and_withdraw_on_a_split_run_are_served_by_one_retrain(tmp_path: Path) -> None:
    generate(regions=["all"], customers=[1400], seed=3, out_dir=tmp_path / "source")
    path = write_tiny_config(tmp_path, regions={"x": 10}, overrides={"unlearning.shards": 2})
    raw = load_config(path).to_dict()
    raw.pop("regions")
    raw["split"] = {"input": str(tmp_path / "source" / "all.csv"), "regions": ["eu", "us"], "by": "hash"}
    (tmp_path / "split.yaml").write_text(json.dumps(raw))
    run, state = tmp_path / "runs" / "split", tmp_path / "state"
    cfg = materialise_regions(load_config(tmp_path / "split.yaml"), data_dir=run / "regions")  # as `fedcrm run`
    run_simulated(cfg, run_dir=run, state_root=state, report=lambda s: None)

    view = run_view(run, region="eu", state_root=state)
    forgotten, withdrawn = [cid for cid, shard in view.trained.items() if shard == 0][:2]
    eu_file = run / "regions" / "eu.csv"
    rows_before = len(load_table(eu_file, load_schema(cfg.schema_path)))

    forget_customers(region="eu", customer_ids=[forgotten], state_root=state, runs=[run])
    withdraw_consent(
        state_dir=state / "eu", region="eu", customer_id=withdrawn, purpose="churn", actor="operator:test", runs=(run,)
    )

    # The forgotten customer's row left fedcrm's copy of the table; the other rows are unchanged.
    after = load_table(eu_file, load_schema(cfg.schema_path))
    assert len(after) == rows_before - 1 and forgotten not in set(after.ids) and withdrawn in set(after.ids)
    assert json.loads((run / "regions" / "manifest.json").read_text())["regions"]["eu"]["rows"] == len(after)

    result = retrain_run(run, state_root=state, report=lambda s: None)
    assert result.stale == [0]
    rows = [json.loads(line) for line in (run / "erasures.jsonl").read_text().splitlines()]
    # Both served at once by exclusion (shard 0 dropped, shard 1 still served), then by the one retrain.
    assert sorted((r["kind"], r["runs"][0]["served_by"]) for r in rows) == [
        ("consent_withdrawal", "exclusion"),
        ("consent_withdrawal", "retrain"),
        ("erasure", "exclusion"),
        ("erasure", "retrain"),
    ]
    retrained = run_view(run, region="eu", state_root=state).trained
    assert forgotten not in retrained and withdrawn not in retrained
    # The forgotten id is written nowhere in the run folder (table copy, receipts, metrics, logs); the
    # customer who only withdrew consent stays in the table (still a customer), and nowhere else.
    for f in run.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert forgotten.encode() not in data, f
            assert withdrawn.encode() not in data or f == eu_file, f
