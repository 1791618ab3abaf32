"""Which shard a customer is in, and whether they are held out: keyed hashes under the region's secret.

A customer's shard comes from a keyed hash of their id under a secret only their region holds, so
shard membership cannot be guessed from an id, and stays stable across runs and re-imports.
"""

from __future__ import annotations

import numpy as np

from fedcrm.data.split import hash_buckets
from fedcrm.privacy.ledger_population import HOLDOUT_SCALE, holdout_threshold
from fedcrm.state.secret import region_secret, region_secret_path

# The secret lives in fedcrm.state.secret; these names stay importable from here for the modules that
# hash ids into shards and the hold-out next to it.
__all__ = ["holdout_mask", "region_secret", "region_secret_path", "shard_of"]


def shard_of(ids: np.ndarray, *, shards: int, secret: str) -> np.ndarray:
    if shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return hash_buckets(ids, buckets=shards, key=f"shard:{secret}")


def holdout_mask(ids: np.ndarray, *, fraction: float, secret: str) -> np.ndarray:
    """Hold-out customers, chosen stably by a keyed hash of the id under the region's secret.

    Nobody outside the region can tell who is held out; the fraction is the region's policy's, so two
    queries at nearby fractions (which would differ by about one customer) cannot be asked for.
    """
    # The same integer threshold the ledger records for the releases on either side of this mask.
    return hash_buckets(ids, buckets=HOLDOUT_SCALE, key=f"holdout:{secret}") < holdout_threshold(fraction)
