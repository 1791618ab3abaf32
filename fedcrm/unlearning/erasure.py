"""Erasure requests at a region: the durable request store, ``forget``, the stale-shard marker, receipts.

A request is served in two steps that may be days apart and may crash in between:

1. ``forget`` (at the data owner's side): every id is checked against the region's table before
   anything is written; then one request file per customer is written (pending), the customers are
   tombstoned (from here on no load of the region's data sees them), and the shard of every run that
   trained on them is marked stale in ``RUN_DIR/erasure_pending.json``. Re-running after a crash
   finishes what was started; a customer already forgotten is refused.
2. ``fedcrm retrain RUN_DIR`` (:mod:`fedcrm.unlearning.retrain`) retrains the stale constituents and
   marks the requests served, with a receipt per request.

What is stored where: the region's state folder holds the request files, which carry the customer's
salted reference (the audit log's HMAC, never the id) and a keyed shard hash that lets a later run with
any number of shards find the customer's shard. The run folder (the server's side) learns only a shard
index and a random request id, never anything derived from the id.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.errors import StorageError, UnlearningError

REQUESTS_DIR = "erasures"
RUN_MARKER = "erasure_pending.json"
RECEIPTS_DIR = "receipts"
HISTORY_FILE = "erasures.jsonl"
PENDING = "pending"
SERVED = "served"
NOT_TRAINED = "not_trained"  # the run never trained on the customer (hold-out, no consent)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write-then-rename with fsync, so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StorageError(f"{path}: damaged JSON ({e}); restore it from a backup") from None


def run_key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


@dataclass
class RunErasure:
    """What one request means for one run: the shard to retrain, and the outcome once served."""

    shard: int | None
    shards: int
    status: str
    model_version_before: int | None = None
    model_version_after: int | None = None
    served_at: str | None = None
    epsilon_before: float | None = None
    epsilon_after: float | None = None
    note: str = ""


@dataclass
class ErasureRequest:
    """One customer's erasure at one region, as the region stores it (state folder only)."""

    request_id: str
    region: str
    customer_ref: str
    shard_key: int
    requested_at: str
    requested_by: str
    tombstoned_at: str | None = None
    runs: dict[str, RunErasure] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return PENDING if self.tombstoned_at is None or any(r.status == PENDING for r in self.runs.values()) else SERVED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErasureRequest:
        d = {k: v for k, v in d.items() if k != "status"}
        d["runs"] = {k: RunErasure(**v) for k, v in d.get("runs", {}).items()}
        return cls(**d)

    def receipt(self, run_dir: Path) -> dict[str, Any]:
        """The receipt for one run: nothing in it identifies the customer without the region's secret."""
        r = self.runs[run_key(run_dir)]
        charge = None
        if r.epsilon_before is not None and r.epsilon_after is not None:
            charge = r.epsilon_after - r.epsilon_before
        return {
            "request_id": self.request_id,
            "kind": "erasure",
            "region": self.region,
            "customer_ref": self.customer_ref,
            "run": Path(run_dir).name,
            "shard": r.shard,
            "shards": r.shards,
            "status": r.status,
            "model_version_before": r.model_version_before,
            "model_version_after": r.model_version_after,
            "requested_at": self.requested_at,
            "tombstoned_at": self.tombstoned_at,
            "served_at": r.served_at,
            "privacy": {"epsilon_before": r.epsilon_before, "epsilon_after": r.epsilon_after, "charge": charge,
                        "scope": f"region {self.region}, shard {r.shard}"},
            "note": r.note,
        }


class ErasureStore:
    """The region's erasure requests, one JSON file each under ``<state>/erasures/`` (atomic rewrites)."""

    def __init__(self, state_dir: Path, *, region: str) -> None:
        self.dir = Path(state_dir) / REQUESTS_DIR
        self.region = region

    def _path(self, request_id: str) -> Path:
        return self.dir / f"{request_id}.json"

    def all(self) -> list[ErasureRequest]:
        if not self.dir.exists():
            return []
        out = [ErasureRequest.from_dict(read_json(p)) for p in sorted(self.dir.glob("*.json"))]
        return [r for r in out if r.region == self.region]

    def get(self, request_id: str) -> ErasureRequest:
        p = self._path(request_id)
        if not p.exists():
            raise UnlearningError(f"region {self.region}: no erasure request {request_id} in {self.dir}")
        return ErasureRequest.from_dict(read_json(p))

    def by_ref(self) -> dict[str, ErasureRequest]:
        return {r.customer_ref: r for r in self.all()}

    def save(self, request: ErasureRequest) -> None:
        atomic_write_json(self._path(request.request_id), request.to_dict())

    def pending_for(self, run_dir: Path) -> list[ErasureRequest]:
        key = run_key(run_dir)
        return [r for r in self.all() if key in r.runs and r.runs[key].status == PENDING]


# -- the run's stale-shard marker (the server's side) ------------------------------------------------


def read_marker(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / RUN_MARKER
    if not p.exists():
        return {"stale": [], "attempt": None}
    data: dict[str, Any] = read_json(p)
    return data


def mark_stale(run_dir: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Add ``{"region", "request_id", "shard"}`` entries to the run's marker (idempotent)."""
    marker = read_marker(run_dir)
    seen = {(e["region"], e["request_id"]) for e in marker["stale"]}
    for e in entries:
        if (e["region"], e["request_id"]) not in seen:
            marker["stale"].append({"region": e["region"], "request_id": e["request_id"], "shard": int(e["shard"])})
    atomic_write_json(Path(run_dir) / RUN_MARKER, marker)


# -- forget ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunView:
    """What forget needs to know about one run: where it is, its shard count, and who it trained on."""

    run_dir: Path
    shards: int
    model_version: int | None
    trained: dict[str, int]  # customer id -> shard, for the customers the run trained on at this region


def forget(
    *,
    state_dir: Path,
    region: str,
    customer_ids: Sequence[str],
    table_ids: np.ndarray,
    runs: Sequence[RunView] = (),
    actor: str = "unknown",
) -> list[ErasureRequest]:
    """Tombstone the customers and mark the runs' constituents that trained on them stale.

    ``table_ids`` are the ids in the region's current table (tombstoned ones included); ``runs`` say
    which customers each run trained on (see :func:`fedcrm.unlearning.retrain.run_view`). All ids are
    checked before anything is written: an unknown id or one already forgotten refuses the whole call.
    A request whose tombstoning did not complete (a crash) is completed rather than refused.
    """
    from fedcrm.data.split import stable_hash
    from fedcrm.governance.audit_log import AuditAction
    from fedcrm.governance.audit_trail import region_audit_log
    from fedcrm.unlearning.shards import region_secret
    from fedcrm.unlearning.tombstones import Tombstones

    ids = list(dict.fromkeys(str(i).strip() for i in customer_ids))
    if not ids or any(not i for i in ids):
        raise UnlearningError("give at least one non-empty customer id (--customer-id ID or --file ids.txt)")
    tombstones = Tombstones(state_dir)
    store = ErasureStore(state_dir, region=region)
    audit = region_audit_log(state_dir)
    known = {str(i) for i in table_ids}
    existing = store.by_ref()
    already = [i for i in ids if tombstones.contains(i)]
    if already:
        refs = [existing[r].request_id for r in (audit.customer_ref(i) for i in already) if r in existing]
        raise UnlearningError(
            f"region {region}: {len(already)} of the {len(ids)} customer(s) were already forgotten "
            f"({', '.join(already[:5])}{' ...' if len(already) > 5 else ''}"
            + (f"; requests {', '.join(refs[:5])}" if refs else "")
            + "). Nothing was changed; see `fedcrm retrain RUN_DIR` for pending retrains."
        )
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UnlearningError(
            f"region {region}: {len(unknown)} customer id(s) are not in the region's table: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Nothing was changed; check the "
            "spelling (ids are matched exactly, as the table's id column spells them)."
        )

    secret = region_secret(state_dir)
    requests: list[ErasureRequest] = []
    for cid in ids:
        ref = audit.customer_ref(cid)
        req = existing.get(ref)
        if req is None:
            req = ErasureRequest(
                request_id=f"erasure-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}",
                region=region,
                customer_ref=ref,
                shard_key=stable_hash(cid, key=f"shard:{secret}"),
                requested_at=now(),
                requested_by=actor,
            )
        for view in runs:
            key = run_key(view.run_dir)
            if key in req.runs:
                continue
            shard = view.trained.get(cid)
            if shard is None:
                req.runs[key] = RunErasure(
                    shard=None, shards=view.shards, status=NOT_TRAINED,
                    model_version_before=view.model_version, model_version_after=view.model_version,
                    served_at=now(), note="the run never trained on this customer (hold-out or no consent): "
                    "no constituent to retrain",
                )
            else:
                req.runs[key] = RunErasure(shard=shard, shards=view.shards, status=PENDING,
                                           model_version_before=view.model_version)
        store.save(req)  # pending, durable before the tombstone
        requests.append(req)

    tombstones.add(ids)
    stamp = now()
    for req in requests:
        if req.tombstoned_at is None:
            req.tombstoned_at = stamp
            store.save(req)
            audit.append(
                actor=actor,
                action=AuditAction.ERASURE_REQUESTED,
                details={"request_id": req.request_id, "customer": req.customer_ref, "region": region,
                         "stale": [{"run": Path(k).name, "shard": r.shard} for k, r in req.runs.items()
                                   if r.status == PENDING]},
            )
    for view in runs:
        key = run_key(view.run_dir)
        entries = [{"region": region, "request_id": r.request_id, "shard": r.runs[key].shard}
                   for r in requests if r.runs[key].status == PENDING]
        if entries:
            mark_stale(view.run_dir, entries)
        for r in requests:
            if r.runs[key].status == NOT_TRAINED:
                record_receipt(view.run_dir, r, region_audit_head=audit.head())
    return requests


def record_receipt(run_dir: Path, request: ErasureRequest, *, region_audit_head: str) -> dict[str, Any]:
    """Write the receipt JSON and its line in the run's history (once per request and model version).

    ``region_audit_head`` is the region's audit log head once the erasure is recorded there: the data
    owner can later show, with `fedcrm audit verify --expect-head`, that the log still holds that record.
    """
    receipt = request.receipt(run_dir) | {"region_audit_head": region_audit_head}
    atomic_write_json(Path(run_dir) / RECEIPTS_DIR / f"{request.request_id}.json", receipt)
    history = Path(run_dir) / HISTORY_FILE
    done = set()
    if history.exists():
        for line in history.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash: written again below
            done.add((row.get("request_id"), row.get("model_version_after")))
    if (receipt["request_id"], receipt["model_version_after"]) not in done:
        append_line(history, receipt)
    return receipt


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line durably; after a torn last line (a crash), start on a fresh line."""
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
