"""ε by numerical composition of privacy loss random variables (PRVs), Gopi, Lee and Wutschitz,
"Numerical Composition of Differential Privacy" (NeurIPS 2021).

Each (σ, q, steps) of a history is a Poisson-subsampled Gaussian PRV (its CDF in closed form,
propositions B1 and B4 of the paper), truncated to a domain [-L, L] wide enough for the target errors
(remark 5.6), discretised on one mesh (its mean kept, by a shift), self-composed ``steps`` times by FFT,
then the different mechanisms convolved pairwise; ε is read off the composed PMF, plus ``eps_error``:
an upper bound.

The same computation, with the same constants (ε error 0.01, δ error δ/1000), as Opacus 1.6's
``PRVAccountant`` (the accountant fedcrm used before 0.2.0), so the ε a ledger reports is unchanged
(a test compares the two); it lives here because Opacus's package import pulls torch. The FFTs are
scipy's (a third faster than numpy's on the grid's arbitrary even lengths); the pairwise convolution is
done with them too, as scipy.signal would, whose import alone (0.5 s) is longer than a small history's
whole computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import fft, integrate
from scipy.special import erfc

from fedcrm.privacy.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_per_step

EPS_ERROR = 0.01
DELTA_ERROR_FRACTION = 1e-3  # δ error = δ / 1000
_SQRT2 = math.sqrt(2)

History = Sequence[tuple[float, float, int]]  # (σ, q, steps), steps >= 1


@dataclass(frozen=True)
class _Grid:
    """An even number of equally spaced points from ``t_min`` to ``t_max``, moved right by ``shifts`` in all."""

    t_min: float
    t_max: float
    size: int
    shifts: float = 0.0

    @classmethod
    def aligned(cls, t_min: float, t_max: float, dt: float) -> _Grid:
        t_min, t_max = math.floor(t_min / dt) * dt, math.ceil(t_max / dt) * dt
        size = int(np.round((t_max - t_min) / dt)) + 1
        if size % 2 == 1:  # the FFT self-composition needs an even length
            size, t_max = size + 1, t_max + dt
        grid = cls(t_min, t_max, size)
        if abs(grid.dt - dt) / dt >= 1e-8:
            raise RuntimeError(f"the PRV mesh {grid.dt} drifted from the asked {dt}")
        return grid

    def shift_right(self, dt: float) -> _Grid:
        return replace(self, t_min=self.t_min + dt, t_max=self.t_max + dt, shifts=self.shifts + dt)

    @property
    def dt(self) -> float:
        return (self.t_max - self.t_min) / (self.size - 1)

    @property
    def ts(self) -> np.ndarray:
        return np.linspace(self.t_min, self.t_max, self.size)


def _cdf(t: np.ndarray | float, *, sigma: float, q: float) -> np.ndarray:
    """CDF of the privacy loss of one Poisson-subsampled Gaussian step (zero below log(1 - q))."""
    inside = t > np.log(1 - q)
    # z only matters inside the support; 1 elsewhere keeps the log quiet.
    z = np.log(np.where(inside, (np.exp(t) + q - 1) / q, 1))
    return np.where(
        inside,
        -q * erfc((2 * z * sigma**2 - 1) / (2 * _SQRT2 * sigma)) / 2
        - (1 - q) * erfc((2 * z * sigma**2 + 1) / (2 * _SQRT2 * sigma)) / 2
        + 1.0,
        0.0,
    )


class _Truncated:
    """A step's PRV conditioned on [t_min, t_max)."""

    def __init__(self, *, sigma: float, q: float, t_min: float, t_max: float) -> None:
        self.sigma, self.q, self.t_min, self.t_max = sigma, q, t_min, t_max
        # Kept: the quadrature of the mean calls cdf thousands of times.
        self._low = _cdf(t_min, sigma=sigma, q=q)
        self._mass = _cdf(t_max, sigma=sigma, q=q) - self._low

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        inner = (_cdf(t, sigma=self.sigma, q=self.q) - self._low) / self._mass
        return np.where(t < self.t_min, 0.0, np.where(t < self.t_max, inner, 1.0))

    def mean(self) -> float:
        """E[T] = t F(t) |_a^b - ∫_a^b F, piecewise on log-spaced points around 0 where F changes fast."""
        low_exp, high_exp = int(np.log10(np.abs(self.t_min))), int(np.log10(self.t_max))
        points = np.concatenate(
            [
                [self.t_min],
                -np.logspace(start=low_exp, stop=-5, num=10),
                [0],
                np.logspace(start=-5, stop=high_exp, num=10),
                [self.t_max],
            ]
        )
        mean = 0.0
        for left, right in zip(points[:-1], points[1:], strict=True):
            integral, _ = integrate.quad(self.cdf, left, right, limit=500)
            mean += right * self.cdf(right) - left * self.cdf(left) - integral
        return float(mean)


def _discretise(prv: _Truncated, grid: _Grid) -> tuple[np.ndarray, _Grid]:
    """The PMF of ``prv`` on ``grid`` (mass of each cell), the grid shifted so the discrete mean is the true one."""
    ts = grid.ts
    pmf = prv.cdf(ts + grid.dt / 2) - prv.cdf(ts - grid.dt / 2)
    shift = prv.mean() - np.dot(ts, pmf)
    if np.abs(shift) >= grid.dt / 2:
        raise RuntimeError(f"the discretised PRV's mean is {shift} off the true one, over half the mesh {grid.dt}")
    return pmf, grid.shift_right(shift)


def _self_compose(pmf: np.ndarray, grid: _Grid, times: int) -> tuple[np.ndarray, _Grid]:
    """``times`` independent copies summed: the PMF to the power ``times`` in Fourier space, recentred."""
    composed = fft.irfft(fft.rfft(pmf) ** times)
    roll = times - 1 + (len(composed) // 2 if times % 2 == 0 else 0)
    return np.roll(composed, roll), grid.shift_right(grid.shifts * (times - 1))


def _convolve_same(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The linear convolution's centre, ``len(left)`` long (scipy.signal.convolve's ``mode="same"``), by FFT."""
    full_length = len(left) + len(right) - 1
    n = fft.next_fast_len(full_length, real=True)  # zero padding leaves a linear convolution unchanged
    full = fft.irfft(fft.rfft(left, n) * fft.rfft(right, n), n)[:full_length]
    start = (len(right) - 1) // 2
    return full[start : start + len(left)]


def _compose(parts: list[tuple[np.ndarray, _Grid]]) -> tuple[np.ndarray, _Grid]:
    """Convolve neighbours until one is left (a tree, so each convolution pairs similar widths)."""
    while len(parts) > 1:
        merged = [parts.pop()] if len(parts) % 2 == 1 else []
        for (pmf_l, grid_l), (pmf_r, grid_r) in zip(parts[:-1:2], parts[1::2], strict=True):
            merged.append((_convolve_same(pmf_l, pmf_r), grid_l.shift_right(grid_r.shifts)))
        parts = merged
    return parts[0]


def _rdp_epsilon(history: History, delta: float) -> float:
    rdp = sum(rdp_per_step(sample_rate=q, noise_multiplier=s, orders=DEFAULT_ORDERS) * n for s, q, n in history)
    return epsilon_from_rdp(orders=DEFAULT_ORDERS, rdp=np.asarray(rdp), delta=delta)[0]


def _domain_half_width(history: History, *, eps_error: float, delta_error: float) -> float:
    """L of remark 5.6, from RDP bounds on the whole composition and on one step of each mechanism."""
    total_steps = sum(n for _, _, n in history)
    half_width = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        half_width = max(half_width, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total_steps)))
    return max(half_width, eps_error) + 3


def _epsilon_of_pmf(pmf: np.ndarray, grid: _Grid, *, delta: float) -> float:
    """The smallest ε whose hockey-stick divergence on the composed PMF is within ``delta``."""
    ts = grid.ts
    tail = np.flip(np.flip(pmf).cumsum())
    tail_weighted = np.flip(np.flip(pmf * np.exp(-ts)).cumsum())
    neg_delta = np.exp(ts) * tail_weighted - tail
    i = int(np.searchsorted(neg_delta, -delta, side="left"))
    if i <= 0:
        raise RuntimeError(f"the PRV domain is too narrow to read ε at δ = {delta}")
    return float(np.log((tail[i] - delta) / tail_weighted[i]))


def prv_epsilon(history: History, *, delta: float, eps_error: float = EPS_ERROR) -> float:
    """An upper bound on ε at ``delta`` of the composition of ``history``, within ``eps_error`` of the true one."""
    delta_error = delta * DELTA_ERROR_FRACTION
    total_steps = sum(n for _, _, n in history)
    half_width = _domain_half_width(history, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(total_steps * np.log(12 / delta_error) / 2)
    grid = _Grid.aligned(-half_width, half_width, mesh)
    parts = [
        _self_compose(*_discretise(_Truncated(sigma=sigma, q=q, t_min=grid.t_min, t_max=grid.t_max), grid), steps)
        for sigma, q, steps in history
    ]
    pmf, composed = _compose(parts)
    if np.finfo(np.longdouble).eps * composed.size > delta - delta_error:
        raise ValueError(f"δ = {delta} is too small for a PRV grid of {composed.size} points: rounding would dominate")
    return _epsilon_of_pmf(pmf, composed, delta=delta - delta_error) + eps_error
