"""How a region's audit log names customers: keyed hashes under the region's one secret, never ids.

A customer's reference (``customer_ref``) is HMAC-SHA256 of their id under a key derived from the
region's secret (:func:`fedcrm.state.secret.derived_key` with :data:`CUSTOMER_REF_PURPOSE`), so the
audit log needs no key file of its own and a region has exactly one secret to keep private. The key
must stay secret: ids are often short or sequential, so without it anyone could hash every candidate
id and match the log.

Migration. Before one secret per region, the references were keyed by a salt file next to the log
(``audit.log.salt``). A state folder that still has one keeps working: the first time its log needs a
customer key, one ``customer_key_changed`` entry records the switch, and every reference made from then
on uses the region's key. The salt file is kept, read-only and under the same 0600 check, for one
purpose only: finding a customer under the reference they had before, in the entries written before
the switch and in those about a request made before it (a request keeps the reference it was made
under, and its later entries repeat it). Nothing is hashed with the salt for a new reference again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrm.errors import StorageError
from fedcrm.governance.audit_chain import AuditAction, AuditEntry, parse_line
from fedcrm.governance.audit_log import AUDIT_FILE, AuditLog
from fedcrm.state.secret import SECRET_FILE, check_private, derived_key, region_secret

CUSTOMER_REF_PURPOSE = b"fedcrm/audit-customer-ref"
LEGACY_SALT_SUFFIX = ".salt"
LEGACY_SALT_BYTES = 32
MIGRATION_ACTOR = "fedcrm"  # the software itself, on first use of the key: no person asked for it


def hash_customer_id(customer_id: str, *, key: bytes) -> str:
    """HMAC-SHA256 (hex) of a customer id under a secret key, so the log never holds the id in clear."""
    if not isinstance(customer_id, str) or not customer_id:
        raise ValueError(f"customer_id must be a non-empty string, got {customer_id!r}")
    if len(key) < 16:
        raise ValueError(f"key must be at least 16 bytes, got {len(key)}")
    return hmac.new(key, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()


def legacy_salt_path(log_path: str | os.PathLike[str]) -> Path:
    """Where a log written before one secret per region kept its salt: ``<log>.salt`` next to it."""
    p = Path(log_path)
    return p.with_name(p.name + LEGACY_SALT_SUFFIX)


def load_legacy_salt(log_path: str | os.PathLike[str]) -> bytes | None:
    """The legacy salt of the log at ``log_path``, None when there is none; never creates one."""
    path = legacy_salt_path(log_path)
    if not path.exists():
        return None
    check_private(path, what="the audit log's legacy salt")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != LEGACY_SALT_BYTES:
        raise StorageError(
            f"{path}: expected {LEGACY_SALT_BYTES * 2} hex digits of salt, found {len(text)} characters. "
            "The salt file is damaged; restore it from a backup (customer references in the log written "
            "before the region's key took over can only be found with it)."
        )
    return salt


@dataclass(frozen=True)
class CustomerKeys:
    """The key for new references, and the legacy salt that only finds old ones (None when there is none)."""

    current: bytes
    legacy: bytes | None = None

    def ref(self, customer_id: str) -> str:
        return hash_customer_id(customer_id, key=self.current)

    def all_refs(self, customer_id: str) -> tuple[str, ...]:
        """Every reference the customer may go by, today's first."""
        if self.legacy is None:
            return (self.ref(customer_id),)
        return self.ref(customer_id), hash_customer_id(customer_id, key=self.legacy)


def mentions(obj: Any, ref: str) -> bool:
    """Whether ``ref`` is one of the string values anywhere in ``obj`` (an entry's details)."""
    if isinstance(obj, str):
        return obj == ref
    if isinstance(obj, dict):
        return any(mentions(v, ref) for v in obj.values())
    if isinstance(obj, list):
        return any(mentions(v, ref) for v in obj)
    return False


class RegionAuditLog(AuditLog):
    """A region's audit log, in its state folder, naming customers under keys from the region's secret."""

    def __init__(self, path: str | os.PathLike[str], *, state_dir: Path) -> None:
        super().__init__(path)
        self.state_dir = Path(state_dir)
        self._keys: CustomerKeys | None = None

    @classmethod
    def in_state(cls, state_dir: Path) -> RegionAuditLog:
        """The log of the region whose state folder is ``state_dir`` (created on first use)."""
        log = AuditLog.open(Path(state_dir) / AUDIT_FILE)
        return cls(log.path, state_dir=Path(state_dir))

    def customer_ref(self, customer_id: str) -> str:
        """The reference under which ``customer_id`` goes into entries written from now on."""
        return self.keys().ref(customer_id)

    def customer_refs(self, customer_id: str) -> tuple[str, ...]:
        """Every reference ``customer_id`` may appear under in this log or the region's requests."""
        return self.keys().all_refs(customer_id)

    def entries_about(self, customer_id: str) -> list[AuditEntry]:
        """The entries naming ``customer_id``, under today's reference or the one from before the switch."""
        if self.path.stat().st_size == 0:
            return []
        refs = self.customer_refs(customer_id)
        return [e for e in self.entries() if any(mentions(e.details, ref) for ref in refs)]

    def keys(self) -> CustomerKeys:
        """The region's customer keys; on a log with a legacy salt, records the switch to the region's key once."""
        if self._keys is None:
            current = derived_key(region_secret(self.state_dir), purpose=CUSTOMER_REF_PURPOSE)
            legacy = load_legacy_salt(self.path)
            if legacy is not None and not self._switch_recorded():
                self.append(
                    actor=MIGRATION_ACTOR,
                    action=AuditAction.CUSTOMER_KEY_CHANGED,
                    details={
                        "key": f"HMAC-SHA256({SECRET_FILE}, {CUSTOMER_REF_PURPOSE.decode()})",
                        "legacy_key": legacy_salt_path(self.path).name,
                        "legacy_refs": "made before this entry; kept by requests made before it; never made again",
                    },
                )
            self._keys = CustomerKeys(current=current, legacy=legacy)
        return self._keys

    def _switch_recorded(self) -> bool:
        """Whether a ``customer_key_changed`` entry is in the log (the chain itself is ``verify``'s job)."""
        with open(self.path, "rb") as f:
            for raw in f:
                if b'"customer_key_changed"' not in raw:
                    continue
                entry = parse_line(raw.rstrip(b"\n"))
                if isinstance(entry, AuditEntry) and entry.action == AuditAction.CUSTOMER_KEY_CHANGED.value:
                    return True
        return False
