"""The region's one secret, ``<state>/<region>/region_secret.key``, and the keys derived from it.

Every keyed hash of a customer id at a region comes from this secret: shards and the hold-out
(:mod:`fedcrm.unlearning.shards`), tombstones and consent withdrawals (keyed tokens), reproducible noise
keys (:mod:`fedcrm.privacy.randomness`) and the audit log's customer references
(:mod:`fedcrm.governance.customer_refs`). One file to keep private and to back up; each use that needs
raw key bytes takes its own domain-separated key (:func:`derived_key`), so no two uses share a key.

The secret is created once, 0600, whole or not at all, and refused when other users may read it: anyone
who has it can hash every candidate id and recognise customers in shards, tokens and the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fedcrm.durable import create_once
from fedcrm.errors import StorageError

SECRET_FILE = "region_secret.key"


def region_secret_path(state_dir: Path) -> Path:
    return Path(state_dir) / SECRET_FILE


def region_secret(state_dir: Path) -> str:
    """The region's secret key, created once (0600) in its state folder, whole or not at all."""
    path = region_secret_path(state_dir)
    if not path.exists():
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        create_once(path, secrets.token_hex(32).encode("ascii"), what="create the region's secret", mode=0o600)
    secret = path.read_text().strip()
    if not secret:
        # An empty key would still hash ids: every token and shard would silently change meaning.
        raise StorageError(
            f"{path}: the region's secret is empty (a creation cut short); the region's tombstones, consent "
            "withdrawals and shards depend on it: restore the file from a backup, or delete it only if the "
            "region has no tombstones, withdrawals or trained shards yet"
        )
    check_private(path, what="the region's secret")
    return secret


def check_private(path: Path, *, what: str) -> None:
    """Refuse a key file that users other than its owner may read or write (mode must be 0600 or stricter)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise StorageError(
            f"{path}: {what} is open to other users (mode {oct(mode)}, expected 0o600); it must stay "
            f"secret, or customer ids hashed under it can be recovered. Run `chmod 600 {path}`."
        )


def derived_key(secret: str, *, purpose: bytes) -> bytes:
    """HMAC-SHA256(secret, purpose): a key for one use only, from which the secret cannot be recovered."""
    if not secret or not purpose:
        raise ValueError("derived_key needs a non-empty secret and purpose")
    return hmac.new(secret.encode("utf-8"), purpose, hashlib.sha256).digest()
