"""Privacy accounting maths: ε of a history of DP-SGD releases, and σ planned to land on a target ε.

Pure functions over frozen values, no state and no I/O, so the ledger, the planner and the tests all
compose the *same* history the same way. The numbers are those of Opacus's RDP and PRV accountants,
computed by :mod:`fedcrm.privacy.rdp` and :mod:`fedcrm.privacy.prv` in the same arithmetic (Opacus's
package import pulls torch, seconds that a data owner's ``fedcrm budget`` must not wait for); tests
check them against Opacus itself and against Google's dp_accounting.

Pitfalls of those accountants that this module guards against (seen in opacus 1.6.0):

- PRV fails on an empty history (``cannot convert float NaN to integer``) and on a history made only
  of zero-step entries (``ZeroDivisionError``); RDP reports ε ≈ 0.10 (not 0) for zero steps, an
  artefact of converting RDP at a finite largest order. Zero-step releases spend nothing, so they are
  dropped first.
- With Opacus's default orders (up to 63) RDP cannot report ε below about 0.1 at δ = 1e-5, whatever
  σ: the optimum sits on the largest order. The orders are extended to 1024, as dp_accounting's
  defaults are, so small spends are not overstated.
- PRV's cost grows with the number of history entries, and splitting one release into many identical
  entries changes nothing in the maths (composition is commutative) but costs ~10x more. Identical
  (σ, q) entries are merged by summing their steps.
- PRV returns an *upper bound* that includes an absolute ``eps_error`` (0.01): for tiny spends the
  relative error is large, always on the conservative side.

Speed: the RDP of one step at every order depends only on (σ, q) and is kept per (σ, q) by
:func:`fedcrm.privacy.rdp.rdp_per_step`; the sum over the history and the conversion to ε follow in the
same order as Opacus's ``RDPAccountant``, so the numbers are bit-for-bit its own. PRV results are kept
per (history, δ). Both caches hold only numbers derived from public parameters, never data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from fedcrm.errors import PrivacyBudgetError
from fedcrm.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_per_step

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# Opacus's default orders plus dp_accounting's largest ones: see the module docstring.
RDP_ORDERS: list[float] = list(DEFAULT_ORDERS) + [128, 256, 512, 1024]
ALL_ORDERS: tuple[float, ...] = tuple(RDP_ORDERS)
# The integer orders among them: their RDP is a finite sum, the fractional ones' a slow series.
INTEGER_ORDERS: tuple[float, ...] = tuple(a for a in RDP_ORDERS if float(a).is_integer())

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


@dataclass(frozen=True)
class NonPrivateRelease:
    """A release made without DP (``privacy.mode: none``, where a region's policy allows it): ε = ∞."""


Release = GaussianRelease | NonPrivateRelease


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), typically below 1 / number of customers, got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _rdp_epsilon(
    history: list[tuple[float, float, int]], delta: float, *, orders: tuple[float, ...] | None = None
) -> float:
    # RDPAccountant.get_privacy_spent's arithmetic: sum of per-mechanism RDP (steps × per-step), then
    # the conversion at the best order. At the end of the range of orders the bound is merely loose
    # (see the module docstring), so no warning is given.
    orders = orders or ALL_ORDERS
    rdp = sum(rdp_per_step(sample_rate=q, noise_multiplier=sigma, orders=orders) * steps for sigma, q, steps in history)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps, _ = epsilon_from_rdp(orders=orders, rdp=np.asarray(rdp), delta=delta)
    return eps


@lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # Imported here: PRV needs scipy's erfc and quadrature (~0.5 s), which RDP-only commands never pay.
    from fedcrm.privacy.prv import prv_epsilon

    return prv_epsilon(history, delta=delta)


def _history(releases: Sequence[Release]) -> list[tuple[float, float, int]]:
    """Merge identical (σ, q) releases and drop zero-step ones; composition order does not matter."""
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for release in releases:
        if isinstance(release, NonPrivateRelease):
            raise ValueError("a non-private release has no finite ε; epsilon() reports it as inf")
        if not isinstance(release, GaussianRelease):
            raise ValueError(f"releases must be GaussianRelease values, got {type(release).__name__}")
        if release.steps == 0:
            continue
        key = (float(release.noise_multiplier), float(release.sample_rate))
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(release.steps)
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()]


def epsilon(releases: Sequence[Release], *, delta: float, accountant: AccountantName | str) -> float:
    """ε at ``delta`` of the composition of *all* ``releases`` (∞ once any of them was not private).

    One call over the whole history, never a sum of per-release ε: composing the mechanisms is much
    tighter than adding their ε, and a fresh accountant per round under-reports the total.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    if any(isinstance(release, NonPrivateRelease) for release in releases):
        return math.inf
    history = _history(releases)
    if not history:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # q = 1 makes PRV take log(0) on a branch np.where then discards; the result is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = _rdp_epsilon(history, delta) if accountant == "rdp" else _prv_epsilon(tuple(history), float(delta))
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
    it), and the search stops once that ε is within 0.5% below the target.
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
    _check_accountant(accountant)
    # Every region of the same size plans the same σ; one client process serves many regions.
    return _plan(float(target_epsilon), float(delta), float(sample_rate), int(steps), str(accountant), tuple(prior))


@lru_cache(maxsize=256)
def _plan(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[GaussianRelease, ...],
) -> float:
    spent = epsilon(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(
            f"the releases already made spend ε = {spent:.4g} at δ = {delta:g}, which reaches the target "
            f"ε = {target_epsilon:g}: no further training fits. Raise the budget, or stop training."
        )

    def release(sigma: float) -> list[GaussianRelease]:
        return [*prior, GaussianRelease(sigma, sample_rate, int(steps))]

    too_small = PrivacyBudgetError(
        f"even σ = {MAX_NOISE_MULTIPLIER:g} brings ε past the target {target_epsilon:g} "
        f"(already spent {spent:.4g}): the remaining budget is too small for {steps} more "
        "steps. Raise the budget, or train fewer steps."
    )
    if accountant != "rdp":
        return _search(
            lambda s: epsilon(release(s), delta=delta, accountant=accountant),
            target_epsilon,
            start=1.0,
            factor=2.0,
            too_small=too_small,
        )
    # RDP: first on the integer orders alone, ~20x cheaper (the fractional orders' series is the cost).
    # ε over all orders is a minimum over more orders, so it is at most the integer orders' ε: the σ
    # found is already within the target, and the search on all orders starts right next to it.
    coarse = _search(
        lambda s: _rdp_epsilon(_history(release(s)), delta, orders=INTEGER_ORDERS),
        target_epsilon,
        start=1.0,
        factor=2.0,
        too_small=too_small,
    )
    return _search(
        lambda s: epsilon(release(s), delta=delta, accountant="rdp"),
        target_epsilon,
        start=coarse,
        factor=1.05,
        too_small=too_small,
    )


def _search(
    eps_at: Callable[[float], float], target: float, *, start: float, factor: float, too_small: Exception
) -> float:
    """The σ that ``_plan`` returns: ε(σ) <= target, and within the tolerance below it.

    Brackets from ``start`` (multiplying or dividing by ``factor``), then narrows by regula falsi in
    log σ / log ε (Illinois variant), where ε(σ) is nearly a straight line: a few accountant calls
    instead of a dozen bisections. Each call is the costly part.
    """
    sigma_low, sigma_high = start, start
    eps_low = eps_high = eps_at(start)
    if eps_high > target:
        while eps_high > target:
            sigma_low, eps_low = sigma_high, eps_high
            sigma_high = factor * sigma_high
            if sigma_high > MAX_NOISE_MULTIPLIER:
                raise too_small
            eps_high = eps_at(sigma_high)
    else:
        while eps_low <= target:
            sigma_high, eps_high = sigma_low, eps_low
            if target - eps_high <= PLAN_RELATIVE_TOLERANCE * target:
                return sigma_high
            sigma_low = sigma_low / factor
            eps_low = eps_at(sigma_low)

    aim = math.log(target * (1 - PLAN_RELATIVE_TOLERANCE / 2))
    kept_low = kept_high = 0
    for _ in range(_MAX_BISECTIONS):
        if target - eps_high <= PLAN_RELATIVE_TOLERANCE * target:
            break
        x_low, x_high = math.log(sigma_low), math.log(sigma_high)
        if math.isfinite(eps_low) and eps_low > 0 and eps_high > 0:
            y_low = (math.log(eps_low) - aim) / (2 if kept_low >= 2 else 1)
            y_high = (math.log(eps_high) - aim) / (2 if kept_high >= 2 else 1)
            x = x_high - y_high * (x_high - x_low) / (y_high - y_low)
            margin = 0.01 * (x_high - x_low)
            x = min(max(x, x_low + margin), x_high - margin)
        else:
            x = (x_low + x_high) / 2
        sigma = math.exp(x)
        eps = eps_at(sigma)
        # Only a σ whose ε was seen to be within the target is ever kept, so the result never overshoots
        # even where the numerical PRV accountant is not perfectly monotone in σ.
        if eps <= target:
            sigma_high, eps_high = sigma, eps
            kept_low, kept_high = kept_low + 1, 0
        else:
            sigma_low, eps_low = sigma, eps
            kept_low, kept_high = 0, kept_high + 1
    return sigma_high
