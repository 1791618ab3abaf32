"""The region's one request store: erasure and consent withdrawal, their receipts, the migration.

Erasure and consent withdrawal are the same kind of request: the customer's data must stop training
(every purpose, or one), the constituents that trained on them are served without them, and the
request gets a receipt. One store holds both, ``<state>/requests/<request_id>.json`` (one file each,
rewritten atomically through :mod:`fedcrm.durable`), with a ``kind`` (``erasure`` or
``consent_withdrawal``), the customer's keyed reference (the audit log's HMAC, never the id), its
deadline, and per run the constituent to serve and how it was served:

- ``pending``: the customer is still in the run's served model;
- ``excluded``: the served model no longer uses the constituent (erasure by exclusion, at once, no ε);
  a retrain to restore it is pending;
- ``served``: the constituent was retrained without the customer;
- ``not_trained``: the run never trained on the customer (hold-out, no consent).

One receipt format (``fedcrm-request-receipt`` version 1, ``schemas/receipt-v1.schema.json``) is written
to ``<state>/receipts/`` (every run) and to each run's ``RUN_DIR/receipts/`` and ``erasures.jsonl``
(that run only). State folders of older versions (``erasures/*.json``, ``pending_requests.jsonl``) are
migrated the first time the store is opened.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fedcrm.durable import append_line, write_json_atomically
from fedcrm.errors import UnlearningError
from fedcrm.unlearning.marker import read_json

ERASURE = "erasure"
CONSENT_WITHDRAWAL = "consent_withdrawal"
KINDS = (ERASURE, CONSENT_WITHDRAWAL)
REQUESTS_DIR = "requests"
RECEIPTS_DIR = "receipts"
HISTORY_FILE = "erasures.jsonl"
RECEIPT_FORMAT = "fedcrm-request-receipt"
RECEIPT_VERSION = 1
DEFAULT_DEADLINE_DAYS = 30
PENDING = "pending"
EXCLUDED = "excluded"
SERVED = "served"
NOT_TRAINED = "not_trained"
LEGACY_ERASURES_DIR = "erasures"
LEGACY_PENDING_FILE = "pending_requests.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def deadline_after(requested_at: str, *, days: int) -> str:
    return (datetime.fromisoformat(requested_at) + timedelta(days=days)).isoformat(timespec="seconds")


def run_key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def new_request_id(kind: str) -> str:
    prefix = "erasure" if kind == ERASURE else "consent"
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class RunEntry:
    """What one request means for one run: the shard to serve, and how (and when) it was served."""

    shard: int | None
    shards: int
    status: str
    model_version_before: int | None = None
    model_version_after: int | None = None
    served_at: str | None = None
    excluded_at_version: int | None = None
    epsilon_before: float | None = None
    epsilon_after: float | None = None
    note: str = ""

    @property
    def open(self) -> bool:
        """The constituent still waits for a retrain (the customer may or may not still be served)."""
        return self.status in (PENDING, EXCLUDED)


@dataclass
class Request:
    """One customer's erasure or consent withdrawal at one region, as the region stores it."""

    request_id: str
    kind: str
    region: str
    customer_ref: str
    requested_at: str
    requested_by: str
    deadline: str
    purpose: str | None = None  # None: every purpose (an erasure)
    shard_key: int | None = None
    recorded_at: str | None = None  # when the tombstone or withdrawal became durable
    runs: dict[str, RunEntry] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        *,
        kind: str,
        region: str,
        customer_ref: str,
        actor: str,
        deadline_days: int,
        purpose: str | None = None,
        shard_key: int | None = None,
        runs: dict[str, RunEntry] | None = None,
    ) -> Request:
        """A request made now, due ``deadline_days`` from now (the region policy's erasure_deadline_days)."""
        requested = now()
        return cls(
            request_id=new_request_id(kind),
            kind=kind,
            region=region,
            customer_ref=customer_ref,
            requested_at=requested,
            requested_by=actor,
            deadline=deadline_after(requested, days=deadline_days),
            purpose=purpose,
            shard_key=shard_key,
            runs=dict(runs or {}),
        )

    @property
    def status(self) -> str:
        if self.recorded_at is None or any(r.status == PENDING for r in self.runs.values()):
            return PENDING
        return EXCLUDED if any(r.status == EXCLUDED for r in self.runs.values()) else SERVED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        d = {k: v for k, v in d.items() if k != "status"}
        d["runs"] = {k: RunEntry(**v) for k, v in d.get("runs", {}).items()}
        return cls(**d)

    def receipt(self, run_dir: Path | None = None) -> dict[str, Any]:
        """The receipt (every run, or ``run_dir``'s only): nothing in it identifies the customer without
        the region's secret."""
        keys = [run_key(run_dir)] if run_dir is not None else sorted(self.runs)
        return {
            "format": RECEIPT_FORMAT,
            "version": RECEIPT_VERSION,
            "request_id": self.request_id,
            "kind": self.kind,
            "purpose": self.purpose,
            "region": self.region,
            "customer_ref": self.customer_ref,
            "status": self.status,
            "requested_at": self.requested_at,
            "recorded_at": self.recorded_at,
            "deadline": self.deadline,
            "runs": [_run_receipt(k, self.runs[k], region=self.region) for k in keys],
        }


def _run_receipt(key: str, r: RunEntry, *, region: str) -> dict[str, Any]:
    charge = None
    if r.epsilon_before is not None and r.epsilon_after is not None:
        charge = r.epsilon_after - r.epsilon_before
    served_by = {SERVED: "retrain", EXCLUDED: "exclusion", NOT_TRAINED: "not_trained"}.get(r.status)
    return {
        "run": Path(key).name,
        "shard": r.shard,
        "shards": r.shards,
        "status": r.status,
        "served_by": served_by,
        "model_version_before": r.model_version_before,
        "model_version_after": r.model_version_after,
        "excluded_at_version": r.excluded_at_version,
        "served_at": r.served_at,
        "privacy": {
            "epsilon_before": r.epsilon_before,
            "epsilon_after": r.epsilon_after,
            "charge": charge,
            "scope": None if r.shard is None else f"region {region}, shard {r.shard}",
        },
        "note": r.note,
    }


class RequestStore:
    """The region's requests, one JSON file each under ``<state>/requests/`` (atomic rewrites)."""

    def __init__(self, state_dir: Path, *, region: str) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / REQUESTS_DIR
        self.region = region
        migrate_legacy(self.state_dir, region=region)

    def _path(self, request_id: str) -> Path:
        return self.dir / f"{request_id}.json"

    def all(self, *, kind: str | None = None) -> list[Request]:
        if not self.dir.exists():
            return []
        out = [Request.from_dict(read_json(p)) for p in sorted(self.dir.glob("*.json"))]
        return [r for r in out if r.region == self.region and kind in (None, r.kind)]

    def get(self, request_id: str) -> Request:
        p = self._path(request_id)
        if not p.exists():
            raise UnlearningError(f"region {self.region}: no request {request_id} in {self.dir}")
        return Request.from_dict(read_json(p))

    def exists(self, request_id: str) -> bool:
        return self._path(request_id).exists()

    def save(self, request: Request) -> None:
        """The request file, then the region's receipt: both atomic, both through fedcrm.durable."""
        write_json_atomically(self._path(request.request_id), request.to_dict(), what="record the request")
        write_json_atomically(
            self.state_dir / RECEIPTS_DIR / f"{request.request_id}.json",
            request.receipt(),
            what="write the request's receipt",
        )

    def open_for(self, run_dir: Path) -> list[Request]:
        """Requests whose constituent in ``run_dir`` waits for a retrain (pending or excluded)."""
        key = run_key(run_dir)
        return [r for r in self.all() if r.recorded_at is not None and key in r.runs and r.runs[key].open]


def record_receipt(run_dir: Path, request: Request, *, region_audit_head: str | None = None) -> dict[str, Any]:
    """Write the run's receipt and its line in the run's history (once per request and model version).

    ``region_audit_head`` is the region's audit-log head once the request's service is recorded there:
    the data owner can later show (`fedcrm audit verify --expect-head`) that the log still holds it.
    """
    receipt = request.receipt(run_dir)
    if region_audit_head is not None:
        receipt["region_audit_head"] = region_audit_head
    write_json_atomically(
        Path(run_dir) / RECEIPTS_DIR / f"{request.request_id}.json", receipt, what="write the request's receipt"
    )
    version = receipt["runs"][0]["model_version_after"]
    if (receipt["request_id"], version) not in history_keys(run_dir):
        append_line(Path(run_dir) / HISTORY_FILE, json.dumps(receipt, sort_keys=True), what="record the erasure")
    return receipt


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's receipts, oldest first; a torn last line (a crash) is skipped (it is written again)."""
    path = Path(run_dir) / HISTORY_FILE
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _run_part(row: dict[str, Any]) -> dict[str, Any]:
    """A history row's per-run part (rows written before receipt version 1 were flat)."""
    runs = row.get("runs")
    return dict(runs[0]) if runs else row


def history_keys(run_dir: Path) -> set[tuple[str, int | None]]:
    return {(row.get("request_id", ""), _run_part(row).get("model_version_after")) for row in history(run_dir)}


def retrained_ids(run_dir: Path) -> set[str]:
    """Requests whose constituent in this run was retrained (served by retrain)."""
    return {row["request_id"] for row in history(run_dir) if _run_part(row).get("status") == SERVED}


# -- migration from the two stores of older versions ---------------------------------------------------


def migrate_legacy(state_dir: Path, *, region: str) -> None:
    """Move ``erasures/*.json`` and ``pending_requests.jsonl`` into the one store (idempotent, crash-safe).

    Each request is written in the new store before its old record is removed, so a crash part-way
    leaves it in both places, and the next open finishes the move without writing it twice.
    """
    legacy_dir = state_dir / LEGACY_ERASURES_DIR
    legacy_pending = state_dir / LEGACY_PENDING_FILE
    if not legacy_dir.is_dir() and not legacy_pending.exists():
        return
    target = state_dir / REQUESTS_DIR
    for p in sorted(legacy_dir.glob("*.json")) if legacy_dir.is_dir() else []:
        d = read_json(p)
        if not (target / p.name).exists():
            _save_migrated(state_dir, _from_legacy_erasure(d))
        p.unlink()
    if legacy_dir.is_dir() and not any(legacy_dir.iterdir()):
        legacy_dir.rmdir()
    if legacy_pending.exists():
        for line in legacy_pending.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: that withdrawal never completed
            if not (target / f"{row['request_id']}.json").exists():
                _save_migrated(state_dir, _from_legacy_consent(state_dir, row, region=region))
        legacy_pending.unlink()


def _save_migrated(state_dir: Path, request: Request) -> None:
    write_json_atomically(
        state_dir / REQUESTS_DIR / f"{request.request_id}.json", request.to_dict(), what="migrate the request"
    )
    write_json_atomically(
        state_dir / RECEIPTS_DIR / f"{request.request_id}.json", request.receipt(), what="migrate the request's receipt"
    )


def _from_legacy_erasure(d: dict[str, Any]) -> Request:
    runs = {
        k: RunEntry(**{f: v for f, v in r.items() if f in RunEntry.__dataclass_fields__})
        for k, r in d.get("runs", {}).items()
    }
    return Request(
        request_id=d["request_id"],
        kind=ERASURE,
        region=d["region"],
        customer_ref=d["customer_ref"],
        requested_at=d["requested_at"],
        requested_by=d.get("requested_by", "unknown"),
        deadline=deadline_after(d["requested_at"], days=DEFAULT_DEADLINE_DAYS),
        shard_key=d.get("shard_key"),
        recorded_at=d.get("tombstoned_at"),
        runs=runs,
    )


def _from_legacy_consent(state_dir: Path, row: dict[str, Any], *, region: str) -> Request:
    old_receipt = state_dir / RECEIPTS_DIR / f"{row['request_id']}.json"
    actor = read_json(old_receipt).get("requested_by", "unknown") if old_receipt.exists() else "unknown"
    runs: dict[str, RunEntry] = {}
    for c in row.get("stale_constituents", []):
        served = row["request_id"] in retrained_ids(Path(c["run_dir"]))
        runs[c["run_dir"]] = RunEntry(
            shard=int(c["shard"]),
            shards=int(c["shards"]),
            status=SERVED if served else PENDING,
            model_version_before=c.get("model_version"),
        )
    requested = row["requested"]
    return Request(
        request_id=row["request_id"],
        kind=CONSENT_WITHDRAWAL,
        region=region,
        customer_ref=row["customer_ref"],
        requested_at=requested,
        requested_by=actor,
        deadline=deadline_after(requested, days=DEFAULT_DEADLINE_DAYS),
        purpose=row["purpose"],
        recorded_at=requested,
        runs=runs,
    )
