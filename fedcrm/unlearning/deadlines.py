"""Erasure deadlines: which requests at a region are still open, how each is served, and which are late.

A request is due ``erasure_deadline_days`` (region policy, default 30: GDPR Art. 12(3)) after it was
made. It is *overdue* when that day has passed and some run still serves a constituent trained on the
customer (``pending``: a single-constituent run waiting for its retrain). A request served by exclusion
is not overdue (the customer is in no served model) but stays listed until the retrain restores the
constituent, priced at the ε that retrain would cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import region_audit_log
from fedcrm.governance.request_store import PENDING, Request, RequestStore
from fedcrm.privacy.accountant import AccountantName
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.unlearning.budget import retrain_budget


@dataclass(frozen=True)
class OpenRequest:
    request: Request
    days_left: float
    overdue: bool
    runs: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "request_id": r.request_id,
            "kind": r.kind,
            "purpose": r.purpose,
            "customer_ref": r.customer_ref,
            "requested_at": r.requested_at,
            "deadline": r.deadline,
            "days_left": round(self.days_left, 2),
            "overdue": self.overdue,
            "status": r.status,
            "runs": self.runs,
        }


def open_requests(
    state_dir: Path,
    *,
    region: str,
    budget: float,
    delta: float,
    accountant: AccountantName | str,
    at: datetime | None = None,
) -> list[OpenRequest]:
    """Every request with a run still waiting for a retrain (or not yet recorded), oldest first."""
    at = at or datetime.now(timezone.utc)
    ledger = PrivacyLedger.open(state_dir, region=region) if (state_dir / "privacy_ledger.sqlite").exists() else None
    out = []
    for req in sorted(RequestStore(state_dir, region=region).all(), key=lambda r: r.requested_at):
        waiting = {k: e for k, e in req.runs.items() if e.open}
        if req.recorded_at is not None and not waiting:
            continue
        runs = []
        for key, e in sorted(waiting.items()):
            cost = (
                retrain_budget(ledger, shard=e.shard, budget=budget, delta=delta, accountant=accountant)
                if ledger is not None and e.shard is not None
                else None
            )
            how = (
                f"served by exclusion at version {e.excluded_at_version}; retrain pending"
                if e.status != PENDING
                else "still served: waits for a retrain (no other constituent to serve)"
            )
            runs.append(
                {
                    "run": Path(key).name,
                    "shard": e.shard,
                    "shards": e.shards,
                    "status": e.status,
                    "how": how,
                    "retrain": cost.as_dict() if cost else None,
                }
            )
        days_left = (datetime.fromisoformat(req.deadline) - at).total_seconds() / 86400
        overdue = days_left < 0 and req.status == PENDING
        out.append(OpenRequest(req, days_left, overdue, runs))
    return out


def audit_overdue(state_dir: Path, overdue: list[OpenRequest], *, actor: str) -> None:
    """One ``erasure_overdue`` event per overdue request, each time it is found overdue."""
    audit = region_audit_log(state_dir)
    for o in overdue:
        audit.append(
            actor=actor,
            action=AuditAction.ERASURE_OVERDUE,
            details={
                "request_id": o.request.request_id,
                "customer": o.request.customer_ref,
                "kind": o.request.kind,
                "deadline": o.request.deadline,
                "days_overdue": round(-o.days_left, 2),
            },
        )
