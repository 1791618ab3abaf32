"""An empirical privacy audit: how well can an attacker tell a region's training customers from its
hold-out customers by the served model's loss, and what ε does that success imply at least?

Loss-threshold membership inference (Yeom et al. 2018): guess "member" when the model's loss on a
customer is below a threshold. For an (ε, δ)-DP training, every threshold's rates obey
``TPR ≤ e^ε·FPR + δ`` and ``TNR ≤ e^ε·FNR + δ`` (Kairouz et al. 2015), so observed rates give
``ε ≥ log((TPR − δ) / FPR)``. With finite samples we use one-sided Clopper–Pearson bounds (TPR from
below, FPR from above) and a Bonferroni correction over every threshold and direction tried, so the
reported lower bound holds with the stated confidence for the threshold picked after the fact
(Jagielski et al. 2020).

Assumptions, said plainly: members and non-members are a random split (the hold-out is chosen by a
keyed hash of the customer id, independent of the data), and the bound is per customer, like the
ledger's ε. A lower bound above the ledger's ε means the DP path does not do what it claims: a bug.
The attack is weak (a single threshold on the loss), so a small lower bound does not prove privacy;
it can only refute a claim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

THRESHOLDS = 20
_EPS = 1e-7


def clopper_pearson(k: int, n: int, *, alpha: float) -> tuple[float, float]:
    """One-sided (1 − alpha) bounds on a binomial rate k/n: (lower, upper), each holding alone."""
    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-customer log-loss of predicted probabilities ``p`` for labels ``y``."""
    q = np.clip(p.astype(np.float64), _EPS, 1 - _EPS)
    return np.asarray(-(y * np.log(q) + (1 - y) * np.log(1 - q)), dtype=np.float64)


@dataclass(frozen=True)
class AttackResult:
    members: int
    non_members: int
    auc: float  # P(member's loss < non-member's loss); 0.5 = no better than a coin
    advantage: float  # max over thresholds of TPR − FPR
    epsilon_lower_bound: float  # holds with probability ≥ confidence
    confidence: float
    delta: float
    threshold: float | None  # the loss threshold giving the bound (None when the bound is 0)
    tpr_lower: float
    fpr_upper: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_threshold_attack(
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    thresholds: int = THRESHOLDS,
) -> AttackResult:
    """Run the attack on given losses; the ε bound is tried at ``thresholds`` quantiles of all losses."""
    m, nm = np.asarray(member_losses, float), np.asarray(non_member_losses, float)
    if len(m) == 0 or len(nm) == 0:
        raise ValueError("the attack needs both members and non-members")
    is_member = np.r_[np.ones(len(m)), np.zeros(len(nm))]
    score = -np.r_[m, nm]  # lower loss: more likely a member
    auc = float(roc_auc_score(is_member, score))
    fpr_curve, tpr_curve, _ = roc_curve(is_member, score)
    advantage = float(np.max(tpr_curve - fpr_curve))

    levels = (np.arange(thresholds) + 0.5) / thresholds
    cuts = np.unique(np.quantile(np.r_[m, nm], levels))
    # Two CP bounds per direction, two directions per threshold: Bonferroni over all of them.
    alpha = (1 - confidence) / (4 * len(cuts))
    best: tuple[float, float | None, float, float] = (0.0, None, 0.0, 1.0)
    for t in cuts:
        tp, fp = int((m <= t).sum()), int((nm <= t).sum())
        for hits, n_hits, false, n_false in ((tp, len(m), fp, len(nm)), (len(nm) - fp, len(nm), len(m) - tp, len(m))):
            lo, _ = clopper_pearson(hits, n_hits, alpha=alpha)
            _, hi = clopper_pearson(false, n_false, alpha=alpha)
            if lo - delta > 0 and hi > 0:
                eps = math.log((lo - delta) / hi)
                if eps > best[0]:
                    best = (eps, float(t), lo, hi)
    return AttackResult(
        members=len(m),
        non_members=len(nm),
        auc=auc,
        advantage=advantage,
        epsilon_lower_bound=best[0],
        confidence=confidence,
        delta=delta,
        threshold=best[1],
        tpr_lower=best[2],
        fpr_upper=best[3],
    )


def verdict(result: AttackResult, *, claimed_epsilon: float | None, tolerance: float = 1e-9) -> str:
    """``violation`` when the empirical lower bound exceeds the claimed ε, else ``consistent``/``no claim``."""
    if claimed_epsilon is None or math.isinf(claimed_epsilon):
        return "no claim"
    return "violation" if result.epsilon_lower_bound > claimed_epsilon + tolerance else "consistent"


def audit_region(
    *,
    region: str,
    cfg: Any,
    served: Any,
    data_path: Path,
    state_dir: Path,
    policy_path: Path | None,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The attack at one data owner's side: their table, their state, the run's served model.

    Members are the region's training customers, non-members its hold-out (after tombstones and
    consent, as in training). The theoretical ε is the region's ledger over its whole history.
    """
    from fedcrm.data.schema import load_schema
    from fedcrm.errors import StorageError
    from fedcrm.region import NodeSettings, Region

    if not (state_dir / "privacy_ledger.sqlite").exists():
        raise StorageError(
            f"region {region}: no state under {state_dir} (its ledger, secret and tombstones); pass the "
            "--state folder the run used"
        )
    schema = load_schema(cfg.schema_path)
    served.check_schema(schema)
    r = Region(NodeSettings(region=region, data_path=data_path, state_dir=state_dir, policy_path=policy_path))
    data = r.load(cfg, schema)
    losses = bce(served.proba(data.x), data.y)
    result = loss_threshold_attack(
        losses[~data.holdout], losses[data.holdout], delta=delta, confidence=confidence
    )
    theoretical = math.inf if cfg.privacy.mode == "none" else r.epsilon(cfg)
    return {
        **result.as_dict(),
        "privacy_mode": cfg.privacy.mode,
        "theoretical_epsilon": None if math.isinf(theoretical) else theoretical,
        "verdict": verdict(result, claimed_epsilon=theoretical),
    }
