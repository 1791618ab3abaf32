"""A region that crashes mid-round: the round completes with the others, and its ledger stays honest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config
from flwr.app import Context, Message

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.accountant import epsilon
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger


def crash_during_training(region: str, round_: int) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """Test-only client mod: local training of ``region`` fails in ``round_`` after its spend was recorded."""

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        import fedcrm.training as training_module  # the region imports train_locally from it per round

        config = msg.content.get("config")
        hit = (
            context.node_config.get("region") == region
            and msg.metadata.message_type == "train"
            and config is not None
            and int(config["server-round"]) == round_
        )
        if not hit:
            return call_next(msg, context)
        real = training_module.train_locally

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError("No space left on device")

        training_module.train_locally = broken  # type: ignore[assignment]
        try:
            return call_next(msg, context)
        finally:
            training_module.train_locally = real

    return mod


def test_a_crash_mid_round_is_survived_reported_and_charged(tmp_path: Path) -> None:
    path = write_tiny_config(
        tmp_path,
        regions={"eu": 500, "us": 500, "apac": 500},
        overrides={"training.rounds": 3, "federation.min_regions": 2},
    )
    state = tmp_path / "state"
    summary = run_simulated(
        load_config(path),
        run_dir=tmp_path / "run",
        state_root=state,
        report=lambda s: None,
        client_mods=[crash_during_training("us", 2)],
    )
    # The server is told one fixed code (which exception it was could depend on the data); the cause is in
    # the region's own log and in the ledger's record of the release that was not sent (below).
    assert summary.events["failed"]["us"] == wire.FAILED_IN_REGION
    assert np.isfinite(summary.final_metrics["auc"])
    # Training releases only: the final evaluation's answers are events too (Gaussian, on the hold-out).
    events = [e for e in PrivacyLedger.open(state / "us", region="us").events() if e.mechanism == MECHANISM_DP_SGD]
    by_round = {e.round: e for e in events}
    assert sorted(by_round) == [1, 2, 3] and len(events) == 3
    # The write-ahead event of the failed round is kept, marked, and still counted in ε.
    assert by_round[2].status == "not_sent" and "No space left" in (by_round[2].outcome_reason or "")
    assert by_round[1].status == by_round[3].status == "sent"
    us, p = PrivacyLedger.open(state / "us", region="us"), summary.privacy["us"]
    charged = us.epsilon_of_shard(shard=0, shards=1, delta=p["delta"], accountant=p["accountant"])
    assert charged == pytest.approx(epsilon([e.release for e in events], delta=p["delta"], accountant=p["accountant"]))
    assert charged > epsilon([by_round[1].release, by_round[3].release], delta=p["delta"], accountant=p["accountant"])
    eu = PrivacyLedger.open(state / "eu", region="eu").events()
    assert [e.status for e in eu if e.mechanism == MECHANISM_DP_SGD] == ["sent"] * 3
