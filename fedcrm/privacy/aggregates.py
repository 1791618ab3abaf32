"""DP answers about a region's hold-out: aggregates released through one Gaussian mechanism each.

Every evaluation answer a region gives (score histograms, loss sums, per-group histograms, feature
importance) is a sum over its hold-out customers in which each customer's share is bounded. Scaled so
that one customer moves each coordinate by at most 1, the answer's L2 sensitivity is the square root of
how many coordinates one customer can touch; Gaussian noise of ``noise_multiplier × sensitivity`` on
every coordinate makes the answer one Gaussian mechanism of that noise multiplier, which the ledger
composes with DP-SGD like any other release (a subsampled Gaussian with q = 1 and one step).

Only the region knows the hold-out (a keyed hash under its secret), and the noise comes from the
release's own randomness, so differencing two answers (two runs, weights the server crafted, an answer
before and after an erasure) yields noise, not a customer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedcrm.privacy.randomness import ReleaseRandomness

# Score histograms in the answers: coarse, so that the noise on each bin stays small against its count,
# and even in log-odds over [-ANSWER_LOGIT_RANGE, ANSWER_LOGIT_RANGE] (scores 0.0003 to 0.9997), so that
# a rare-event model's scores do not all fall into the first bin.
ANSWER_BINS = 24
ANSWER_LOGIT_RANGE = 6.0
# A customer's log-loss is clipped to this before summing: it bounds their share of the loss sum.
LOSS_CAP = 4.0


def sensitivity(coordinates_per_customer: int) -> float:
    """L2 sensitivity of an answer in which one customer moves that many coordinates by at most 1 each."""
    if coordinates_per_customer < 1:
        raise ValueError("an answer must let a customer touch at least one coordinate")
    return math.sqrt(coordinates_per_customer)


def noised(
    parts: Mapping[str, np.ndarray | float],
    *,
    coordinates_per_customer: int,
    noise_multiplier: float,
    randomness: ReleaseRandomness,
) -> dict[str, np.ndarray]:
    """Each part plus Gaussian noise of std ``noise_multiplier × sensitivity`` on every coordinate.

    ``parts`` must already be scaled so that one customer moves any coordinate by at most 1 (counts,
    clipped sums divided by their cap).
    """
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    import torch  # the noise source draws torch tensors; a region's commands that answer nothing skip it

    std = noise_multiplier * sensitivity(coordinates_per_customer)
    out: dict[str, np.ndarray] = {}
    for name, value in parts.items():
        arr = np.asarray(value, dtype=np.float64)
        noise = randomness.normal(arr.shape, std=std, dtype=torch.float64).numpy()
        out[name] = arr + noise
    return out
