"""Rényi DP of the Poisson-subsampled Gaussian mechanism, and its conversion to (ε, δ).

The maths of Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
(2019): at an integer order α the RDP is a finite binomial sum; at a fractional order it is two series
summed until their terms fall below e^-30. The conversion is that of Balle et al., "Hypothesis Testing
Interpretations and Renyi Differential Privacy" (2020), minimised over the orders.

Computed in the same arithmetic, in the same order, as Opacus 1.6's ``opacus.accountants.analysis.rdp``
(the accountant fedcrm used before 0.2.0), so every ε a ledger reports is bit-for-bit what it was; a
test checks that against Opacus's ``RDPAccountant``. It lives here because importing anything from
Opacus imports its whole package, torch included (seconds), and a data owner's ``fedcrm budget`` must
not wait for a deep-learning stack to add up numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

# The orders Opacus's RDP accountant uses by default: 1.1 to 10.9 by tenths, then 12 to 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# A fractional order's series stops once both of its terms are below e^-30.
_SERIES_CUTOFF = -30


def _log_add(log_x: float, log_y: float) -> float:
    """log(e^x + e^y) without overflow."""
    low, high = min(log_x, log_y), max(log_x, log_y)
    if low == -math.inf:
        return high
    return math.log1p(math.exp(low - high)) + high


def _log_sub(log_x: float, log_y: float) -> float:
    """log(e^x - e^y) for x >= y; -inf is zero."""
    if log_x < log_y:
        raise ValueError(f"log-space subtraction must not go negative, got log_x={log_x} < log_y={log_y}")
    if log_y == -math.inf:
        return log_x
    if log_x == log_y:
        return -math.inf
    try:
        return math.log(math.expm1(log_x - log_y)) + log_y
    except OverflowError:
        return log_x


def _log_erfc(x: float) -> float:
    # Through log Φ, which stays finite where erfc itself underflows (large x).
    from scipy.special import log_ndtr  # scipy.special costs ~0.2 s: only where an ε is computed

    return math.log(2) + float(log_ndtr(-x * 2**0.5))


def _log_a_integer(q: float, sigma: float, order: int) -> float:
    """log A_α at an integer order: log Σ_i C(α, i) q^i (1-q)^(α-i) exp((i² - i) / (2σ²))."""
    from scipy.special import binom  # see _log_erfc

    log_a = -math.inf
    for i in range(order + 1):
        log_coef = math.log(binom(order, i)) + i * math.log(q) + (order - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * (sigma**2)))
    return float(log_a)


def _log_a_fractional(q: float, sigma: float, order: float) -> float:
    """log A_α at a fractional order: the integrals below and above z0, each a series in i."""
    from scipy.special import binom  # see _log_erfc

    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = 0
    while True:
        coef = binom(order, i)
        log_coef = math.log(abs(coef))
        j = order - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
        # The generalised binomial coefficient changes sign past i > α: those terms are subtracted.
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < _SERIES_CUTOFF:
            break
    return _log_add(log_a0, log_a1)


def rdp_of_one_step(*, sample_rate: float, noise_multiplier: float, order: float) -> float:
    """RDP at ``order`` of one step: Poisson sampling at ``sample_rate``, Gaussian noise of σ = ``noise_multiplier``."""
    q, sigma = sample_rate, noise_multiplier
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:  # no sampling: the Gaussian mechanism's own RDP
        return order / (2 * sigma**2)
    if math.isinf(order):
        return math.inf
    if float(order).is_integer():
        return _log_a_integer(q, sigma, int(order)) / (order - 1)
    return _log_a_fractional(q, sigma, order) / (order - 1)


def rdp_per_step(*, sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one step at each of ``orders`` (read-only); T steps have T times this."""
    return _rdp_per_step(float(noise_multiplier), float(sample_rate), tuple(orders))


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    # Kept per (σ, q, orders): it depends on nothing else, and it was ~85 % of a client's time per
    # round when recomputed for every reply. Numbers derived from public parameters only, never data.
    rdp = np.array(
        [rdp_of_one_step(sample_rate=sample_rate, noise_multiplier=noise_multiplier, order=a) for a in orders]
    )
    rdp.setflags(write=False)
    return rdp


def epsilon_from_rdp(*, orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(ε, the order that gives it) at ``delta`` for an RDP curve ``rdp`` over ``orders``; (∞, nan) if none is finite.

    ε(α) = RDP(α) - (log δ + log α) / (α - 1) + log((α - 1) / α), minimised over α. At the end of the
    range of orders the bound is merely loose, not wrong: the caller decides whether to say so.
    """
    orders_vec, rdp_vec = np.atleast_1d(np.asarray(orders, dtype=float)), np.atleast_1d(rdp)
    if len(orders_vec) != len(rdp_vec):
        raise ValueError(f"one RDP value per order: {len(orders_vec)} orders, {len(rdp_vec)} values")
    eps = rdp_vec - (np.log(delta) + np.log(orders_vec)) / (orders_vec - 1) + np.log((orders_vec - 1) / orders_vec)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(orders_vec[best])
