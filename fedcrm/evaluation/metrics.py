"""Metrics that compose across regions.

A region never sends per-customer scores. It sends, for its hold-out customers, a histogram of
predicted probabilities per class plus sums (log-loss, Brier, correct predictions). Sums add up, and
AUC computed from the pooled histograms is the pooled AUC (up to ties inside one bin), which the mean
of regional AUCs is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINS = 2000
_EPS = 1e-7


@dataclass
class ScoreSummary:
    """What one region reports about its hold-out: everything adds up across regions."""

    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    sum_log_loss: float = 0.0
    sum_brier: float = 0.0
    correct: float = 0.0

    @classmethod
    def of(
        cls,
        *,
        scores: np.ndarray,
        labels: np.ndarray,
        bins: int = BINS,
        loss_cap: float | None = None,
        logit_range: float | None = None,
    ) -> ScoreSummary:
        """``loss_cap`` clips each customer's log-loss (bounding their share of the sum, for a DP answer).

        ``logit_range`` = L bins the scores evenly in log-odds over [-L, L] instead of in probability:
        with few bins (a DP answer), rare-event models whose scores crowd below 0.1 keep their ranking.
        The edges are fixed, never taken from the data.
        """
        p = np.clip(scores.astype(np.float64), _EPS, 1 - _EPS)
        y = labels.astype(np.int64)
        if logit_range is None:
            idx = np.minimum((p * bins).astype(np.int64), bins - 1)
        else:
            z = (np.log(p) - np.log1p(-p) + logit_range) / (2 * logit_range)
            idx = np.clip((z * bins).astype(np.int64), 0, bins - 1)
        losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        if loss_cap is not None:
            losses = np.minimum(losses, loss_cap)
        return cls(
            hist_pos=np.bincount(idx[y == 1], minlength=bins),
            hist_neg=np.bincount(idx[y == 0], minlength=bins),
            sum_log_loss=float(losses.sum()),
            sum_brier=float(((p - y) ** 2).sum()),
            correct=int(((p >= 0.5) == (y == 1)).sum()),
        )

    @property
    def n(self) -> float:
        return float(self.hist_pos.sum() + self.hist_neg.sum())

    def __add__(self, other: ScoreSummary) -> ScoreSummary:
        return ScoreSummary(
            hist_pos=self.hist_pos + other.hist_pos,
            hist_neg=self.hist_neg + other.hist_neg,
            sum_log_loss=self.sum_log_loss + other.sum_log_loss,
            sum_brier=self.sum_brier + other.sum_brier,
            correct=self.correct + other.correct,
        )

    def metrics(self) -> dict[str, float]:
        n = self.n
        if n <= 0:
            return {}
        return {
            "auc": min(max(auc_from_histograms(self.hist_pos, self.hist_neg), 0.0), 1.0),
            "log_loss": self.sum_log_loss / n,
            "accuracy": min(self.correct / n, 1.0),
            "brier": self.sum_brier / n,
            "customers": float(n),
            "positive_rate": float(self.hist_pos.sum() / n),
        }


def auc_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties (same bin) counted one half."""
    n_pos, n_neg = hist_pos.sum(), hist_neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(hist_neg) - hist_neg
    wins = (hist_pos * neg_below).sum() + 0.5 * (hist_pos * hist_neg).sum()
    return float(wins / (n_pos * n_neg))


def with_noise(value: float, noise_sd: float | None) -> str:
    """``value ± sd`` with only the digits the noise supports: the sd to one significant digit, the value
    to the same decimal place (AUC 0.6897 with sd 0.042 reads ``0.69 ± 0.04``). Without a finite, positive
    sd the value is exact and keeps four decimals."""
    if noise_sd is None or not np.isfinite(noise_sd) or noise_sd <= 0:
        return f"{value:.4f}"
    decimals = max(0, -int(np.floor(np.log10(noise_sd))))
    sd = round(noise_sd, decimals)
    if sd >= 10.0 ** (1 - decimals):  # 0.096 rounds up to 0.1: one decimal fewer
        decimals = max(0, decimals - 1)
        sd = round(noise_sd, decimals)
    return f"{value:.{decimals}f} ± {sd:.{decimals}f}"
