"""Which shard a customer is in, and the region's secret that decides it.

A customer's shard comes from a keyed hash of their id under a secret only their region holds, so
shard membership cannot be guessed from an id, and stays stable across runs and re-imports.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np

from fedcrm.data.split import hash_buckets
from fedcrm.durable import create_once
from fedcrm.errors import StorageError

_KEY_FILE = "region_secret.key"


def region_secret_path(state_dir: Path) -> Path:
    return Path(state_dir) / _KEY_FILE


def region_secret(state_dir: Path) -> str:
    """The region's secret key, created once (0600) in its state folder, whole or not at all."""
    path = region_secret_path(state_dir)
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        create_once(path, secrets.token_hex(32).encode("ascii"), what="create the region's secret", mode=0o600)
    secret = path.read_text().strip()
    if not secret:
        # An empty key would still hash ids: every token and shard would silently change meaning.
        raise StorageError(
            f"{path}: the region's secret is empty (a creation cut short); the region's tombstones, consent "
            "withdrawals and shards depend on it: restore the file from a backup, or delete it only if the "
            "region has no tombstones, withdrawals or trained shards yet"
        )
    return secret


def shard_of(ids: np.ndarray, *, shards: int, secret: str) -> np.ndarray:
    if shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return hash_buckets(ids, buckets=shards, key=f"shard:{secret}")


def holdout_mask(ids: np.ndarray, *, fraction: float, secret: str) -> np.ndarray:
    """Hold-out customers, chosen stably by a keyed hash of the id under the region's secret.

    Nobody outside the region can tell who is held out; the fraction is the region's policy's, so two
    queries at nearby fractions (which would differ by about one customer) cannot be asked for.
    """
    scale = 1_000_000
    return hash_buckets(ids, buckets=scale, key=f"holdout:{secret}") < int(fraction * scale)
