"""How many erasure retrains a shard's privacy budget still allows, read from the region's ledger.

A retrain of constituent k repeats the releases of the last run that trained shard k (same config,
so the same σ, sampling rate and steps up to the shard losing a few customers). Composing that run's
releases again and again onto the shard's history, until the region's budget would be passed, counts
the retrains left: what ``fedcrm budget`` shows per shard, what ``fedcrm forget`` says at request time,
and what ``fedcrm erasures status`` prices each pending request at. ``unlearning.reserve_retrains: K``
asks the region to plan σ so that the initial training plus K retrains fit (docs/erasure.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcrm.privacy.accountant import AccountantName, Release
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger

MAX_COUNTED = 50  # beyond this many retrains the exact number does not change a decision


@dataclass(frozen=True)
class RetrainBudget:
    """One shard's retrain budget: ε now, ε after one more retrain, and how many retrains fit."""

    shard: int
    epsilon_now: float
    epsilon_after_one: float | None  # None: no run has trained this shard, so there is nothing to repeat
    retrains_left: int | None

    @property
    def affordable(self) -> bool:
        return bool(self.retrains_left)

    def as_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "epsilon_now": self.epsilon_now,
            "epsilon_after_one_retrain": self.epsilon_after_one,
            "retrains_left": self.retrains_left,
            "affordable": self.affordable,
        }


def one_retrain(ledger: PrivacyLedger, *, shard: int) -> tuple[list[Release], int]:
    """The training releases of the last run that trained ``shard`` (what a retrain would release again),
    and that run's shard count."""
    events = [e for e in ledger.events(shard) if e.mechanism == MECHANISM_DP_SGD]
    if not events:
        return [], 1
    last = events[-1]
    return [e.release for e in events if e.run_id == last.run_id], last.shards or 1


def retrain_budget(
    ledger: PrivacyLedger, *, shard: int, budget: float, delta: float, accountant: AccountantName | str
) -> RetrainBudget:
    step, shards = one_retrain(ledger, shard=shard)

    def spend(retrains: int) -> float:
        # The worst-off customer of the shard, every partition the region used composed (the ledger's cells).
        return ledger.epsilon_of_shard(
            shard=shard, shards=shards, delta=delta, accountant=accountant, next_release=step * retrains
        )

    now = spend(0)
    if not step:
        return RetrainBudget(shard, now, None, None)
    left = 0
    while left < MAX_COUNTED and spend(left + 1) <= budget:
        left += 1
    return RetrainBudget(shard, now, spend(1), left)


def retrain_budgets(
    ledger: PrivacyLedger, *, budget: float, delta: float, accountant: AccountantName | str
) -> dict[int, RetrainBudget]:
    shards = sorted({e.shard for e in ledger.events()})
    return {k: retrain_budget(ledger, shard=k, budget=budget, delta=delta, accountant=accountant) for k in shards}
