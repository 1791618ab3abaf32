"""A region's customers for one purpose, as the region holds them between messages: encoded, split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RegionData:
    """The region's customers for one purpose, encoded, split into hold-out and training shards."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    holdout: np.ndarray
    shard: np.ndarray
    sensitive: Any
    counts: dict[str, int] = field(default_factory=dict)

    def train_shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = ~self.holdout & (self.shard == k)
        return self.x[m], self.y[m]
