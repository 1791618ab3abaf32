"""Empirical privacy audits in one training run: an ε that the run provably exceeds, with confidence.

The bound is that of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023, arXiv:2305.08846). ``m`` canaries are each included in the training data independently
with probability 1/2. The auditor scores every canary from what it sees (the model, or the updates),
guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest, and abstains on the rest.
For an (ε, δ)-DP training run, the number ``W`` of correct guesses among the ``r = k+ + k-`` made
satisfies, for every ``v`` (their approximate-DP theorem, computed by their Algorithm):

    P[W ≥ v] ≤ P[W' ≥ v] + 2·m·δ·max_{i=1..v} P[v − i ≤ W' < v] / i,    W' ~ Binomial(r, e^ε / (1 + e^ε))

so observing ``v`` correct guesses rejects (ε, δ) at significance ``1 − confidence`` when the right-hand
side is at most that, and the audit reports the largest ε it rejects. The one run is the point: the
canaries' independent coins stand in for the many training runs that a classic audit repeats, so the
bound holds for this run, with no group-privacy cost.

Why this replaced the loss-threshold audit's Clopper–Pearson bound: that bound treats every customer
as an independent trial of the *same* two-dataset experiment, which a single run is not (the model is
one draw shared by all of them), so its confidence did not mean what it said.

Black-box mode (``audit_region``, the run's served model): the canaries are the region's own customers.
The hold-out is chosen by a keyed hash of the customer id (a coin of probability ``f`` per customer,
independent of the data); keeping every hold-out customer and each training customer with a further
secret coin of probability ``f / (1 − f)`` gives a set of customers each "in" with probability exactly
1/2, independently, which is what the theorem needs. The score is minus the served model's loss.
The white-box mode (the auditor plays the server) is :mod:`fedcrm.evaluation.white_box_audit`.

A lower bound above the ledger's ε means the DP path does not do what it claims: a bug. A small lower
bound proves nothing: an audit can only refute a claim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import binom
from sklearn.metrics import roc_auc_score

_EPS = 1e-7
# Guess counts tried, as shares of the canaries: k+ alone, k- alone and k+ = k- (the scores' two tails).
# Fixed in advance, and paid for by a Bonferroni correction, so that picking the best afterwards stays
# valid. k- alone is where a loss attack's signal is: a model that memorised its members fits them all,
# so the highest losses are non-members, while the lowest are members and easy non-members alike.
GUESS_SHARES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
_BISECTIONS = 50


def bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-customer log-loss of predicted probabilities ``p`` for labels ``y``."""
    q = np.clip(p.astype(np.float64), _EPS, 1 - _EPS)
    return np.asarray(-(y * np.log(q) + (1 - y) * np.log(1 - q)), dtype=np.float64)


# -- the bound (pure maths) ------------------------------------------------------------------------


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least ``correct`` of ``guesses`` right] under any (ε, δ)-DP run, bounded as in the theorem.

    ``canaries`` is ``m``, every canary included with probability 1/2, guessed on or not.
    """
    m, r, v = canaries, guesses, correct
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if epsilon < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need ε >= 0 and 0 <= δ <= 1, got ε = {epsilon}, δ = {delta}")
    q = float(expit(epsilon))  # the accuracy of ε-DP randomised response, the worst case for each guess
    tail = float(binom.sf(v - 1, r, q))  # P[W' >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= W' < v]
    return min(tail + 2 * m * delta * float(np.max(window / i)), 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose (ε, δ) claim the observed guesses reject at ``significance`` (0 when none).

    The p-value grows with ε (a larger ε lets a run be more accurate), so the rejected ε form an interval
    from 0, found by doubling and bisection as in the paper's own code.
    """

    def rejects(eps: float) -> bool:
        return p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) <= significance

    if guesses == 0 or not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):
        low, high = high, 2 * high
        if high > 1e3:  # only reached with nearly every canary guessed right and δ = 0
            return low
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if rejects(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class OneRunResult:
    """What a one-run audit found: ε_lb holds with probability ≥ ``confidence`` over the canaries' coins."""

    canaries: int
    included: int
    guesses_in: int  # k+
    guesses_out: int  # k-
    correct: int
    hypotheses: int  # guess counts tried (Bonferroni)
    auc: float  # of the scores, in vs out: 0.5 = no better than a coin
    epsilon_lower_bound: float
    confidence: float
    delta: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def guess_counts(canaries: int, *, shares: tuple[float, ...] = GUESS_SHARES) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried: every share of ``canaries`` as k+ alone, as k- alone and as k+ = k-."""
    ks = sorted({max(1, round(s * canaries)) for s in shares if round(s * canaries) <= canaries})
    return [(k, 0) for k in ks] + [(0, k) for k in ks] + [(k, k) for k in ks if 2 * k <= canaries]


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    hypotheses: list[tuple[int, int]] | None = None,
) -> OneRunResult:
    """Guess from ``scores`` (higher: more likely included) and bound ε from the correct guesses.

    Every (k+, k-) of ``hypotheses`` (by default :func:`guess_counts`; fix them before looking at the
    scores) is tried, each at significance (1 − confidence) / (their number), and the best bound is
    reported: it holds with the stated confidence.
    """
    s, inc = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError("scores and included must be 1-D arrays of the same non-zero length")
    m = len(s)
    # Ties broken by a random order, so equal scores (e.g. after an exactly removed noise) carry no
    # hidden information from the canaries' order.
    order = np.lexsort((np.random.default_rng().permutation(m), s))
    ranked = inc[order]  # lowest score first
    hyps = guess_counts(m) if hypotheses is None else hypotheses
    significance = (1 - confidence) / len(hyps)
    best = (0.0, 0, 0, 0)
    for k_in, k_out in hyps:
        correct = int(ranked[m - k_in :].sum()) + int((~ranked[:k_out]).sum())
        eps = epsilon_lower_bound(
            canaries=m, guesses=k_in + k_out, correct=correct, delta=delta, significance=significance
        )
        if eps > best[0]:
            best = (eps, k_in, k_out, correct)
    auc = float(roc_auc_score(inc, s)) if 0 < inc.sum() < m else math.nan
    return OneRunResult(
        canaries=m,
        included=int(inc.sum()),
        guesses_in=best[1],
        guesses_out=best[2],
        correct=best[3],
        hypotheses=len(hyps),
        auc=auc,
        epsilon_lower_bound=best[0],
        confidence=confidence,
        delta=delta,
    )


def verdict(epsilon_lb: float, *, claimed_epsilon: float | None, tolerance: float = 1e-9) -> str:
    """``violation`` when the empirical lower bound exceeds the claimed ε, else ``consistent``/``no claim``."""
    if claimed_epsilon is None or math.isinf(claimed_epsilon):
        return "no claim"
    return "violation" if epsilon_lb > claimed_epsilon + tolerance else "consistent"


# -- black box: the served model, the region's customers as canaries -------------------------------


def customer_canaries(holdout: np.ndarray, *, holdout_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which customers serve as canaries: each then a member with probability 1/2, independently.

    A customer is held out with probability ``f`` (a keyed hash of its id); keeping every customer of
    the smaller side and each of the larger side with probability ``f / (1 − f)`` (or its inverse)
    makes P(member | canary) = 1/2. ``rng`` must be the auditor's own, unknown to the training.
    """
    f = holdout_fraction
    keep_member, keep_held_out = min(1.0, f / (1 - f)), min(1.0, (1 - f) / f)
    coin = rng.random(len(holdout))
    return np.where(holdout, coin < keep_held_out, coin < keep_member)


def audit_region(
    *,
    region: str,
    cfg: Any,
    served: Any,
    data_path: Path,
    state_dir: Path,
    policy_path: Path | None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The black-box audit at one data owner's side: their table, their state, the run's served model.

    Canaries are the region's customers (after tombstones and consent, as in training), members its
    training customers; the claimed ε is the region's ledger over its whole history, at its δ.
    """
    from fedcrm.data.schema import load_schema
    from fedcrm.errors import StorageError
    from fedcrm.node_settings import owner_settings
    from fedcrm.region import Region

    if not (state_dir / "privacy_ledger.sqlite").exists():
        raise StorageError(
            f"region {region}: no state under {state_dir} (its ledger, secret and tombstones); pass the "
            "--state folder the run used"
        )
    schema = load_schema(cfg.schema_path)
    served.check_schema(schema)
    r = Region(owner_settings(cfg, region=region, data_path=data_path, state_dir=state_dir, policy_path=policy_path))
    data = r.load(cfg, schema)
    chosen = customer_canaries(
        data.holdout, holdout_fraction=cfg.evaluation.holdout_fraction, rng=np.random.default_rng()
    )
    losses = bce(served.proba(data.x[chosen]), data.y[chosen])
    result = one_run_audit(-losses, ~data.holdout[chosen], delta=r.delta, confidence=confidence)
    claimed = math.inf if cfg.privacy.mode == "none" else r.epsilon(cfg)
    return {
        "mode": "black-box",
        **result.as_dict(),
        "privacy_mode": cfg.privacy.mode,
        "claimed_epsilon": None if math.isinf(claimed) else claimed,
        "verdict": verdict(result.epsilon_lower_bound, claimed_epsilon=claimed),
    }
