"""Tenant sampling per round (`federation.fraction_train`): the server draws which regions train, only
those are charged, and the metrics say who was drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.errors import ConfigError
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger
from fedcrm.runs import read_metrics

ROUNDS = 3


def test_each_round_trains_the_drawn_fraction_of_the_eligible_regions_and_only_they_are_charged(
    tmp_path: Path,
) -> None:
    # Six regions that take part, and a seventh whose policy refuses the purpose at pre-flight: it stays
    # connected, so a sampler that drew among all connected nodes could pick it and train only two.
    regions = {f"t{i}": 300 for i in range(6)} | {"refuser": 300}
    no_churn = tmp_path / "refuser-policy.yaml"
    no_churn.write_text("allowed_purposes: [propensity]\n")
    cfg = load_config(
        write_tiny_config(
            tmp_path,
            regions=regions,
            overrides={
                "training.rounds": ROUNDS,
                "federation.fraction_train": 0.5,
                "federation.min_regions": 2,
                "policies": {"refuser": str(no_churn)},
            },
        )
    )
    state = tmp_path / "state"
    summary = run_simulated(cfg, run_dir=tmp_path / "run", state_root=state, report=lambda _: None)

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    eligible = {f"t{i}" for i in range(6)}
    for r in rows:
        # int(6 × 0.5) = 3 drawn among the six eligible regions, every one of them trained (a draw among all
        # seven connected nodes would train two whenever it picks the refuser).
        assert len(r["epsilon"]) == 3 and set(r["epsilon"]) <= eligible, r
        assert set(r["selected"]) == set(r["epsilon"]), r
    for region in eligible:
        drawn_in = [r["round"] for r in rows if region in r["selected"]]
        trained = [
            e
            for e in PrivacyLedger.open(state / region, region=region).events()
            if e.run_id == summary.run_id and e.mechanism == MECHANISM_DP_SGD
        ]
        assert [e.round for e in trained] == drawn_in, region
    assert summary.privacy["refuser"]["refused"] is not None
    refuser_ledger = state / "refuser" / "privacy_ledger.sqlite"
    assert not refuser_ledger.exists() or not PrivacyLedger.open(state / "refuser", region="refuser").events()


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_fraction_train_outside_0_1_is_refused_naming_the_key(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"federation\.fraction_train.*got"):
        load_config(write_tiny_config(tmp_path, overrides={"federation.fraction_train": fraction}))
