"""Consent withdrawn per purpose: customers who said no to one purpose after their data was imported.

The consent column of the table gates each purpose on every load; a withdrawal recorded here gates it
too, so it holds even when the source table still says yes (a re-import from a CRM that has not caught
up). A withdrawal is a keyed token scoped to its purpose in the region's one token file
(:class:`fedcrm.unlearning.tombstones.KeyedTokens`, shared with the tombstones), so the list identifies
no one by itself and every write goes through :mod:`fedcrm.durable`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcrm.unlearning.tombstones import EVERY_PURPOSE, KeyedTokens


class ConsentWithdrawals:
    """The region's (purpose, customer token) consent withdrawals."""

    def __init__(self, state_dir: Path) -> None:
        self.keyed = KeyedTokens(state_dir)
        self.path = self.keyed.path
        self.secret = self.keyed.secret

    def purposes_of(self, customer_id: str) -> list[str]:
        """The purposes this customer withdrew from, in the order they did."""
        return [s for s in self.keyed.scopes_of(customer_id) if s != EVERY_PURPOSE]

    def contains(self, customer_id: str, *, purpose: str) -> bool:
        return self.keyed.token(customer_id) in self.keyed.tokens(purpose)

    def add(self, customer_id: str, *, purpose: str) -> bool:
        """Record the withdrawal durably; False if it was already recorded (nothing written)."""
        if purpose == EVERY_PURPOSE:
            raise ValueError("a consent withdrawal names one purpose; forgetting a customer is `fedcrm forget`")
        return bool(self.keyed.add([customer_id], scope=purpose))

    def mask(self, ids: np.ndarray, *, purpose: str, digests: np.ndarray | None = None) -> np.ndarray:
        """True for customers who withdrew consent to ``purpose`` (``digests``: see :meth:`KeyedTokens.mask`)."""
        return self.keyed.mask(ids, scope=purpose, digests=digests)
