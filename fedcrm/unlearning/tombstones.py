"""The region's keyed-token list: customers forgotten (every purpose) or who withdrew one purpose.

One file, ``<state>/tombstones.txt``, one ``<scope> <token>`` per line: the token is a keyed hash of the
id under the region's secret (so the list does not re-identify anyone, yet a re-import of the same table
drops them again), and the scope is ``*`` for an erasure (no purpose may use them) or the purpose a
consent withdrawal names. Lines are appended through :func:`fedcrm.durable.append_to` (fsync, cut back
on a full disk); a torn last line (a crash mid-write) never completed and is ignored.

Older state folders hold ``tombstones.txt`` with bare tokens (erasures) and a separate
``consent_withdrawals.txt`` (``<purpose> <token>``): both are read, and the first time the list is
opened the withdrawals are merged into the one file (atomically) and the old file removed.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedcrm.durable import append_line, write_text_atomically
from fedcrm.unlearning.shards import region_secret

FILE = "tombstones.txt"
LEGACY_WITHDRAWALS_FILE = "consent_withdrawals.txt"
EVERY_PURPOSE = "*"
_SHA256_BLOCK = 64
_LINE = re.compile(r"^(?:(?P<scope>\*|[A-Za-z0-9_-]+) )?(?P<token>[0-9a-f]{64})$")


def _copyable_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 where it is built in, else OpenSSL's (hashlib's): the same function.

    Four hash states are copied per id (two copies, and each ``digest()`` copies before it finishes):
    a copy of the built-in state is a memcpy, OpenSSL 3's a provider call, which made the keyed hash
    of a million ids 1.5 µs an id instead of 1.1.
    """
    for name in ("_sha2", "_sha256"):  # Python 3.12+, 3.11
        try:
            return cast(Callable[[bytes], Any], importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_COPYABLE_SHA256 = _copyable_sha256()


def id_token(customer_id: str, *, secret: str) -> str:
    return hmac.digest(secret.encode(), customer_id.encode("utf-8"), "sha256").hex()


def id_tokens(ids: np.ndarray, *, secret: str) -> list[str]:
    """:func:`id_token` of every id (a million ids a scoring run, when anyone was ever forgotten)."""
    return [d.hex() for d in id_digests(ids, secret=secret)]


def id_digests(ids: np.ndarray, *, secret: str) -> list[bytes]:
    """The 32 bytes each :func:`id_token` is the hex of.

    HMAC (RFC 2104) with its two keyed SHA-256 states built once and copied per id: 2x faster than
    the one-shot ``hmac.digest``, which sets the key up again for every id. Raw bytes, no hex: the
    membership test compares them with the list's tokens decoded once.
    """
    key = secret.encode()
    key = (hashlib.sha256(key).digest() if len(key) > _SHA256_BLOCK else key).ljust(_SHA256_BLOCK, b"\0")
    new_inner = _COPYABLE_SHA256(bytes(b ^ 0x36 for b in key)).copy
    new_outer = _COPYABLE_SHA256(bytes(b ^ 0x5C for b in key)).copy
    out: list[bytes] = []
    keep = out.append
    for message in map(str.encode, map(str, ids)):  # UTF-8, as id_token encodes
        inner, outer = new_inner(), new_outer()
        inner.update(message)
        outer.update(inner.digest())
        keep(outer.digest())
    return out


def _read(path: Path) -> list[tuple[str, str]]:
    """(scope, token) per complete line; a bare token (the old tombstone format) is scope ``*``."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="ascii", errors="replace").split("\n"):
        m = _LINE.match(line)
        if m:
            out.append((m["scope"] or EVERY_PURPOSE, m["token"]))
    return out


class KeyedTokens:
    """The one keyed-token file of a region: ``add`` records, ``tokens``/``mask`` read by scope."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE
        self.secret = region_secret(self.state_dir)
        self._migrate()

    def _migrate(self) -> None:
        legacy = self.state_dir / LEGACY_WITHDRAWALS_FILE
        if not legacy.exists():
            return
        rows = list(dict.fromkeys(_read(self.path) + _read(legacy)))
        text = "".join(f"{scope} {token}\n" for scope, token in rows)
        write_text_atomically(self.path, text, what="merge the consent withdrawals into the tombstones")
        legacy.unlink()  # only after the merged file is durable: a crash before this merges again, harmlessly

    def token(self, customer_id: str) -> str:
        return id_token(str(customer_id), secret=self.secret)

    def tokens(self, scope: str) -> set[str]:
        return {t for s, t in _read(self.path) if s == scope}

    def scopes_of(self, customer_id: str) -> list[str]:
        """The scopes recorded for this customer, in the order they were."""
        token = self.token(customer_id)
        return list(dict.fromkeys(s for s, t in _read(self.path) if t == token))

    def add(self, customer_ids: list[str], *, scope: str) -> list[str]:
        """Record the ids under ``scope``; returns the tokens newly added (durable on return)."""
        if not _LINE.match(f"{scope} {'0' * 64}"):
            raise ValueError(f"scope must be * or letters, digits, - or _, got {scope!r}")
        known = self.tokens(scope)
        new = [t for t in dict.fromkeys(self.token(i) for i in customer_ids) if t not in known]
        if not new:
            return []
        append_line(self.path, "".join(f"{scope} {t}\n" for t in new), what="record the keyed tokens")
        return new

    def digests(self, ids: np.ndarray) -> np.ndarray:
        """The ids' keyed digests (bytes, an object array), to test against several scopes with one hash an id."""
        out = np.empty(len(ids), dtype=object)
        out[:] = id_digests(ids, secret=self.secret)
        return out

    def mask(self, ids: np.ndarray, *, scope: str, digests: np.ndarray | None = None) -> np.ndarray:
        """True for the ids recorded under ``scope``; ``digests``: :meth:`digests` of ``ids``, if made already."""
        tokens = self.tokens(scope)
        if not tokens:
            return np.zeros(len(ids), dtype=bool)
        wanted = {bytes.fromhex(t) for t in tokens}
        found = id_digests(ids, secret=self.secret) if digests is None else digests
        return np.fromiter(map(wanted.__contains__, found), dtype=bool, count=len(ids))


class Tombstones:
    """Customers forgotten at the region: scope ``*``, no purpose may train or evaluate on them."""

    def __init__(self, state_dir: Path) -> None:
        self.keyed = KeyedTokens(state_dir)
        self.path = self.keyed.path
        self.secret = self.keyed.secret

    def add(self, customer_ids: list[str]) -> list[str]:
        """Tombstone the ids; returns the tokens newly added (durable on return)."""
        return self.keyed.add(customer_ids, scope=EVERY_PURPOSE)

    def contains(self, customer_id: str) -> bool:
        return self.keyed.token(customer_id) in self.keyed.tokens(EVERY_PURPOSE)

    def mask(self, ids: np.ndarray, *, digests: np.ndarray | None = None) -> np.ndarray:
        """True for customers that were forgotten (``digests``: as :meth:`KeyedTokens.mask` takes them)."""
        return self.keyed.mask(ids, scope=EVERY_PURPOSE, digests=digests)
