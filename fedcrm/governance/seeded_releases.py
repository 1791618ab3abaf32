"""The data owner's audited acceptance of releases migrated from fedcrm 0.1 (``seeded`` noise).

fedcrm 0.1 drew each release's noise from a seed derived from the run's config: whoever wrote the config
(the server's side) could regenerate that noise and subtract it, so those releases protect nobody from
the server, and the ledger counts them as ε = ∞ (:attr:`fedcrm.privacy.ledger_store.LedgerEvent.release`).
A data owner who judges that the config's author was not an adversary for those runs (say, the data
owner's own team ran them) may accept them: from then on they count at their recorded σ. That decision
weakens a guarantee, so it is written to the region's audit log first and then, durably and once, to
the region's ledger, where it cannot be changed or taken back.
"""

from __future__ import annotations

from pathlib import Path

from fedcrm.errors import FedcrmError
from fedcrm.governance.audit_log import AuditAction, AuditEntry
from fedcrm.governance.audit_trail import region_audit_log
from fedcrm.privacy.ledger import NOISE_SEEDED, PrivacyLedger

# What the owner states by accepting: recorded word for word in the audit log.
ACCEPTANCE = (
    "the data owner accepts that the seeded releases migrated from fedcrm 0.1 count at their recorded noise "
    "multiplier, although whoever wrote those runs' configs could predict their noise; fedcrm 0.1's "
    "evaluation answers were exact and unrecorded and stay outside every ε"
)


def accept_seeded(*, state_dir: Path, region: str, actor: str) -> AuditEntry:
    """Accept ``region``'s seeded releases: audit entry first, then the ledger's marker; return the entry.

    Refuses when the region has no seeded release or has already accepted them (the marker is written once).
    """
    ledger = PrivacyLedger.open(Path(state_dir), region=region)
    earlier = ledger.seeded_accepted()
    if earlier is not None:
        raise FedcrmError(f"region {region}: its seeded releases were already accepted ({earlier}) in {ledger.path}")
    seeded = [e.id for e in ledger.events() if e.noise == NOISE_SEEDED]
    if not seeded:
        raise FedcrmError(
            f"region {region}: {ledger.path} holds no release migrated from fedcrm 0.1 (noise `seeded`): "
            "there is nothing to accept"
        )
    # Audit first: a crash between the two leaves an audited decision without effect, never the reverse.
    entry = region_audit_log(Path(state_dir)).append(
        actor=actor,
        action=AuditAction.SEEDED_ACCEPTED,
        details={"region": region, "ledger": str(ledger.path), "event_ids": seeded, "statement": ACCEPTANCE},
    )
    ledger.record_seeded_accepted(f"audit entry {entry.seq} ({entry.hash}) by {actor} at {entry.time}")
    return entry
