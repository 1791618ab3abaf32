"""The centralised baseline prepares each region's customers from that region's real state folder:
a forgotten customer or a withdrawn consent is left out of the pooled data, as in a federated run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import write_tiny_config

from fedcrm.baseline import run_centralised
from fedcrm.config import load_config
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.policy import RegionPolicy
from fedcrm.unlearning.shards import holdout_mask, region_secret
from fedcrm.unlearning.tombstones import Tombstones


def test_centralised_baseline_leaves_out_forgotten_and_withdrawn_customers(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300, "us": 200}, overrides={"training.rounds": 1}))
    state = tmp_path / "state"
    before = run_centralised(cfg, run_dir=tmp_path / "before", state_root=state)

    # Two training customers of eu: one forgotten, one who withdrew consent to this purpose, each
    # recorded where `fedcrm forget` / `fedcrm consent withdraw` record them (STATE/eu).
    # Training customers: consenting, and outside the hold-out (keyed by the region's secret, which the
    # first run created in STATE/eu).
    table = load_table(cfg.regions["eu"], load_schema(cfg.schema_path))
    held = holdout_mask(table.ids, fraction=RegionPolicy().holdout_fraction, secret=region_secret(state / "eu"))
    training = table.ids[~held & table.consent[cfg.task].to_numpy(dtype=bool)]
    forgotten, withdrawn = str(training[0]), str(training[1])
    Tombstones(state / "eu").add([forgotten])
    ConsentWithdrawals(state / "eu").add(withdrawn, purpose=cfg.task)

    after = run_centralised(cfg, run_dir=tmp_path / "after", state_root=state)
    eu_before, eu_after = before.regions["eu"], after.regions["eu"]
    assert eu_after["forgotten"] == 1
    assert eu_after["excluded_no_consent"] == eu_before.get("excluded_no_consent", 0) + 1
    assert eu_after["train"] == eu_before["train"] - 2
    assert eu_after["holdout"] == eu_before["holdout"]
    assert after.regions["us"] == before.regions["us"]
    assert after.training["examples"] < before.training["examples"]
    written = json.loads((tmp_path / "after" / "summary.json").read_text(encoding="utf-8"))
    assert written["regions"]["eu"]["forgotten"] == 1
    assert list(written) == [
        "name",
        "kind",
        "task",
        "privacy_mode",
        "final_metrics",
        "privacy",
        "regions",
        "training",
        "warnings",
        "config_sha256",
        "code_version",
        "started",
        "wall_time_s",
    ]
    assert np.isfinite(written["final_metrics"]["auc"])
    assert written["started"] > before.started  # a start time for tracking, as a federated run writes
