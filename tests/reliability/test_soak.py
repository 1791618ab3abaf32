"""Soak: 100 synthetic tenants × 20 rounds in simulation; memory flat, every ledger consistent.

Outside the default run (about 5 minutes on 2 cores): ``make test-soak``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedcrm.config import load_config
from fedcrm.data.synthetic import generate
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.runs import read_metrics

REPO = Path(__file__).resolve().parents[2]
TENANTS, ROUNDS = 100, 20


@pytest.mark.soak
def test_100_tenants_20_rounds_memory_flat_and_ledgers_match_the_rounds_taken(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "experiments"))
    from procmem import TreeSampler  # the benchmarks' /proc sampler of a whole process tree

    data = tmp_path / "tenants"
    generate(regions=TENANTS, customers=1000, seed=0, out_dir=data)
    cfg = load_config(REPO / "configs" / "demo.yaml").with_overrides({"training.rounds": ROUNDS})
    cfg = cfg.model_copy(update={"regions": {p.stem: p for p in sorted(data.glob("*.csv"))}, "name": "soak"})
    assert len(cfg.regions) == TENANTS

    pss_at_round: dict[int, int] = {}
    with TreeSampler(os.getpid(), interval=0.5) as sampler:

        def report(line: str) -> None:
            if line.startswith("round"):
                sampler.sample()
                pss_at_round[int(line.split()[1].split("/")[0])] = sampler.peak.samples[-1][1]

        summary = run_simulated(cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=report)

    # Memory flat: after warm-up (round 3) the whole tree (driver, Ray, actors) grows by < 10 %.
    assert sorted(pss_at_round) == list(range(1, ROUNDS + 1))
    warm, last = pss_at_round[3], pss_at_round[ROUNDS]
    assert last < 1.10 * warm, f"memory grew from {warm / 2**20:.0f} MiB (round 3) to {last / 2**20:.0f} MiB"

    # Every ledger holds exactly the rounds its tenant trained in, all sent, and ε within the target.
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    run_id = summary.run_id
    for tenant in cfg.regions:
        took_part = [r["round"] for r in rows if tenant in r["epsilon"]]
        events = [
            e for e in PrivacyLedger.open(tmp_path / "state" / tenant, region=tenant).events() if e.run_id == run_id
        ]
        assert [e.round for e in events] == took_part, tenant
        assert all(e.status == "sent" for e in events), tenant
        assert summary.privacy[tenant]["releases_this_run"] == len(events)
        assert summary.privacy[tenant]["epsilon"] <= cfg.privacy.target_epsilon
    assert len(rows[-1]["epsilon"]) >= TENANTS - len(summary.events["failed"])
