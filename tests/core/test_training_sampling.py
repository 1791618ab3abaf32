"""Poisson sampling by geometric gaps has the distribution of one coin per customer."""

from __future__ import annotations

import numpy as np
import torch

from fedcrm.training import poisson_sample


def test_each_customer_is_in_with_probability_q_and_batch_sizes_are_binomial() -> None:
    n, q, draws = 60, 0.1, 20_000
    g = torch.Generator().manual_seed(7)
    counts = np.zeros(n)
    sizes = np.zeros(draws)
    for t in range(draws):
        idx = poisson_sample(n, q=q, generator=g).numpy()
        assert len(np.unique(idx)) == len(idx) and (idx >= 0).all() and (idx < n).all()
        counts[idx] += 1
        sizes[t] = len(idx)
    sd = np.sqrt(q * (1 - q) / draws)
    assert np.abs(counts / draws - q).max() < 5 * sd  # every position, including the first and last
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.05
    assert abs(np.mean(sizes == 0) - (1 - q) ** n) < 0.002  # empty batches as often as with coins


def test_large_regions_and_full_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_sample(100_000, q=0.3, generator=g)) for _ in range(50)]
    assert abs(np.mean(sizes) - 30_000) < 5 * np.sqrt(30_000 * 0.7 / 50)
    assert torch.equal(poisson_sample(5, q=1.0, generator=g), torch.arange(5))
