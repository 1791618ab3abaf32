"""Which shard a customer is in, and the region's secret that decides it.

A customer's shard comes from a keyed hash of their id under a secret only their region holds, so
shard membership cannot be guessed from an id, and stays stable across runs and re-imports.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from fedcrm.data.split import hash_buckets

_KEY_FILE = "region_secret.key"


def region_secret_path(state_dir: Path) -> Path:
    return Path(state_dir) / _KEY_FILE


def region_secret(state_dir: Path) -> str:
    """The region's secret key, created once (0600) in its state folder."""
    path = region_secret_path(state_dir)
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
    return path.read_text().strip()


def shard_of(ids: np.ndarray, *, shards: int, secret: str) -> np.ndarray:
    if shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return hash_buckets(ids, buckets=shards, key=f"shard:{secret}")


def holdout_mask(ids: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Hold-out customers, chosen stably by id: the same customer is always in or out."""
    scale = 1_000_000
    return hash_buckets(ids, buckets=scale, key=f"fedcrm-holdout-{seed}") < int(fraction * scale)
