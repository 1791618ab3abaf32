"""Consent withdrawn per purpose: customers who said no to one purpose after their data was imported.

The consent column of the table gates each purpose on every load; a withdrawal recorded here gates it
too, so it holds even when the source table still says yes (a re-import from a CRM that has not caught
up). Only keyed hashes of ids are stored, under the same region secret and the same token as the
tombstones (:func:`fedcrm.unlearning.tombstones.id_token`), so the list identifies no one by itself.

The file is ``<state>/consent_withdrawals.txt``, one ``<purpose> <token>`` per line, appended and
fsynced; a torn last line (a crash mid-write) never completed and is ignored, as with tombstones.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from fedcrm.unlearning.shards import region_secret
from fedcrm.unlearning.tombstones import id_token, id_tokens

_FILE = "consent_withdrawals.txt"
_LINE = re.compile(r"^(?P<purpose>[A-Za-z0-9_-]+) (?P<token>[0-9a-f]{64})$")


class ConsentWithdrawals:
    """The region's durable list of (purpose, customer token) consent withdrawals."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / _FILE
        self.secret = region_secret(Path(state_dir))

    def token(self, customer_id: str) -> str:
        return id_token(str(customer_id), secret=self.secret)

    def tokens(self, purpose: str) -> set[str]:
        if not self.path.exists():
            return set()
        out = set()
        for line in self.path.read_text(encoding="ascii", errors="replace").split("\n"):
            m = _LINE.match(line)
            if m and m["purpose"] == purpose:
                out.add(m["token"])
        return out

    def purposes_of(self, customer_id: str) -> list[str]:
        """The purposes this customer withdrew from, in the order they did."""
        if not self.path.exists():
            return []
        token = self.token(customer_id)
        found: list[str] = []
        for line in self.path.read_text(encoding="ascii", errors="replace").split("\n"):
            m = _LINE.match(line)
            if m and m["token"] == token and m["purpose"] not in found:
                found.append(m["purpose"])
        return found

    def contains(self, customer_id: str, *, purpose: str) -> bool:
        return self.token(customer_id) in self.tokens(purpose)

    def add(self, customer_id: str, *, purpose: str) -> bool:
        """Record the withdrawal durably; False if it was already recorded (nothing written)."""
        if not _LINE.match(f"{purpose} {'0' * 64}"):
            raise ValueError(f"purpose must be letters, digits, - or _, got {purpose!r}")
        token = self.token(customer_id)
        if token in self.tokens(purpose):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # After a torn last line, start a fresh line so the new record is not glued to the fragment.
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with open(self.path, "a", encoding="ascii") as f:
            f.write(("\n" if torn else "") + f"{purpose} {token}\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def mask(self, ids: np.ndarray, *, purpose: str) -> np.ndarray:
        """True for customers who withdrew consent to ``purpose``."""
        tokens = self.tokens(purpose)
        if not tokens:
            return np.zeros(len(ids), dtype=bool)
        return np.fromiter((t in tokens for t in id_tokens(ids, secret=self.secret)), dtype=bool, count=len(ids))
