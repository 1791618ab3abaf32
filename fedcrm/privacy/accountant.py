"""Privacy accounting maths: ε of a history of DP-SGD releases, and σ planned to land on a target ε.

Pure functions over frozen values, no state and no I/O, so the ledger, the planner and the tests all
compose the *same* history the same way. The numbers come from Opacus's accountants, fed a history
directly rather than stepped one batch at a time; tests check them against Google's dp_accounting.

Pitfalls of the Opacus accountants that this module guards against (seen in opacus 1.6.0):

- ``PRVAccountant`` fails on an empty history (``cannot convert float NaN to integer``) and on a
  history made only of zero-step entries (``ZeroDivisionError``); ``RDPAccountant`` reports ε ≈ 0.10
  (not 0) for zero steps, an artefact of converting RDP at a finite largest order. Zero-step releases
  spend nothing, so they are dropped before the accountant sees them.
- With its default orders (up to 63) ``RDPAccountant`` cannot report ε below about 0.1 at δ = 1e-5,
  whatever σ: the optimum sits on the largest order. The orders are extended to 1024, as
  dp_accounting's defaults are, so small spends are not overstated.
- The PRV accountant's cost grows with the number of history entries, and splitting one release into
  many identical entries changes nothing in the maths (composition is commutative) but costs ~10x more.
  Identical (σ, q) entries are merged by summing their steps.
- ``PRVAccountant.get_epsilon`` returns an *upper bound* that includes an absolute ``eps_error`` (0.01):
  for tiny spends the relative error is large, always on the conservative side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from fedcrm.errors import PrivacyBudgetError

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# Opacus's default orders plus dp_accounting's largest ones: see the module docstring.
RDP_ORDERS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS) + [128, 256, 512, 1024]

# Beyond this σ a release spends next to nothing; if the target is still out of reach, it is the prior.
MAX_NOISE_MULTIPLIER = 1e4
PLAN_RELATIVE_TOLERANCE = 0.005
_MAX_BISECTIONS = 60


@dataclass(frozen=True)
class GaussianRelease:
    """One DP-SGD training stretch: a Poisson-subsampled Gaussian mechanism repeated ``steps`` times.

    Frozen, and checked when built, so that a history of releases can be stored and composed later
    without re-checking: an invalid release never exists.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if sigma <= 0:
            raise ValueError(f"noise_multiplier must be > 0 (σ = 0 gives no privacy at all), got {sigma}")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0 < q <= 1):
            raise ValueError(f"sample_rate must be in (0, 1] (batch size / number of customers), got {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), typically below 1 / number of customers, got {delta!r}")


def _make_accountant(accountant: str) -> IAccountant:
    if accountant == "rdp":
        return RDPAccountant()
    if accountant == "prv":
        return PRVAccountant()
    raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _history(releases: Sequence[GaussianRelease]) -> list[tuple[float, float, int]]:
    """Merge identical (σ, q) releases and drop zero-step ones; composition order does not matter."""
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for release in releases:
        if not isinstance(release, GaussianRelease):
            raise ValueError(f"releases must be GaussianRelease values, got {type(release).__name__}")
        if release.steps == 0:
            continue
        key = (float(release.noise_multiplier), float(release.sample_rate))
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(release.steps)
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()]


def epsilon(releases: Sequence[GaussianRelease], *, delta: float, accountant: AccountantName | str) -> float:
    """ε at ``delta`` of the composition of *all* ``releases``.

    One call over the whole history, never a sum of per-release ε: composing the mechanisms is much
    tighter than adding their ε, and a fresh accountant per round under-reports the total.
    """
    _check_delta(delta)
    acct = _make_accountant(accountant)
    history = _history(releases)
    if not history:
        return 0.0
    acct.history = history
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # q = 1 makes PRV take log(0) on a branch np.where then discards; the result is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        # At tiny ε the optimum sits on the largest order (1024, as in dp_accounting): the bound stays
        # valid, merely loose, so Opacus's advice to add orders is noise to a user.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps = acct.get_epsilon(delta, alphas=RDP_ORDERS) if isinstance(acct, RDPAccountant) else acct.get_epsilon(delta)
    eps = float(eps)
    if math.isnan(eps):
        return math.inf
    return max(eps, 0.0)


def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName | str,
    prior: Sequence[GaussianRelease] = (),
) -> float:
    """The smallest σ whose release of ``steps`` steps, composed after ``prior``, stays within the target.

    Planning over the whole remaining run at once (not per round) is what makes the budget land where
    the engineer asked. The returned σ has been checked to give ε <= ``target_epsilon`` (never past
    it), and bisection stops once that ε is within 0.5% below the target.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not (0 < target_epsilon < math.inf)
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 to plan a noise level, got {steps!r}")
    _check_delta(delta)
    GaussianRelease(1.0, sample_rate, int(steps))  # validates sample_rate with the usual message
    prior = list(prior)

    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(
            f"the releases already made spend ε = {spent:.4g} at δ = {delta:g}, which reaches the target "
            f"ε = {target_epsilon:g}: no further training fits. Raise the budget, or stop training."
        )

    def eps_at(sigma: float) -> float:
        return epsilon(
            [*prior, GaussianRelease(sigma, sample_rate, int(steps))], delta=delta, accountant=accountant
        )

    sigma_low, sigma_high = 0.0, 1.0
    eps_high = eps_at(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"even σ = {MAX_NOISE_MULTIPLIER:g} brings ε past the target {target_epsilon:g} "
                f"(already spent {spent:.4g}): the remaining budget is too small for {steps} more "
                "steps. Raise the budget, or train fewer steps."
            )
        eps_high = eps_at(sigma_high)

    for _ in range(_MAX_BISECTIONS):
        if target_epsilon - eps_high <= PLAN_RELATIVE_TOLERANCE * target_epsilon:
            break
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma)
        # Only a σ whose ε was seen to be within the target is ever kept, so the result never overshoots
        # even where the numerical PRV accountant is not perfectly monotone in σ.
        if eps <= target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
