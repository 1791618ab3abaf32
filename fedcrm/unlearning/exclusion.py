"""Erasure by exclusion: the served model stops using the constituent that trained on the customer, now.

A SISA model serves the mean of its S constituents' probabilities, and constituent k saw only shard k.
Dropping constituent k from ``model/model.json`` (a new version serving the mean of the others) and
destroying its weights and checkpoints removes everything the customer's data trained, at once: no
training, no new DP release, no ε. The model is then a little less accurate (S - 1 constituents) until
``fedcrm retrain RUN_DIR`` retrains the excluded constituents without the customer and serves them again;
one retrain serves every request pending on that shard.

With one constituent left to serve (S = 1, or every other constituent already excluded) there is
nothing to fall back on: the request is served by retrain, as before, and the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrm.durable import write_json_atomically
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import SERVER_ACTOR, region_audit_log, server_audit_log
from fedcrm.governance.request_store import (
    EXCLUDED,
    NOT_TRAINED,
    PENDING,
    Request,
    RequestStore,
    now,
    record_receipt,
    run_key,
)
from fedcrm.runs import MODEL_META, ModelMeta
from fedcrm.unlearning.marker import mark_stale, read_marker, write_marker
from fedcrm.unlearning.shred import destroy_constituent, discard_staging


@dataclass(frozen=True)
class Exclusion:
    """What exclusion did to one run: the version now served, or why it could not serve the request."""

    run_dir: Path
    version: int | None  # the served version without the shards; None: not served by exclusion
    shards: tuple[int, ...]  # the shards no longer served (newly or already)
    reason: str = ""


def exclude_shards(run_dir: Path, shards: set[int]) -> Exclusion:
    """Serve ``run_dir`` without constituents ``shards``: new model version, then destroy their files.

    Idempotent: a shard already excluded needs no new version (its files are destroyed again if a crash
    left them). A retrain staged from the old constituents is discarded, since it would serve them again.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / MODEL_META
    model = ModelMeta.read(run_dir)
    meta: dict[str, Any] = model.raw  # rewritten below with every key it has, as found
    served = model.shards
    keep = [k for k in served if k not in shards]
    if not keep:
        why = (
            "the run has a single constituent (unlearning.shards = 1)"
            if len(served) == 1 and int(model.config.get("unlearning", {}).get("shards", 1)) == 1
            else f"constituent(s) {sorted(shards)} are the only one(s) still served"
        )
        return Exclusion(run_dir, None, (), f"{why}: nothing to serve without them; served by retrain instead")
    version = model.version
    if keep != served:
        marker = read_marker(run_dir)
        attempt = marker.get("attempt")
        if attempt:  # its staged model was trained alongside the constituents being excluded
            discard_staging(run_dir / f".retrain-v{attempt['target_version']}")
            marker["attempt"] = None
            write_marker(run_dir, marker)
        version += 1
        excluded = sorted({*meta.get("excluded_shards", []), *(set(served) - set(keep))})
        write_json_atomically(
            meta_path,
            {**meta, "version": version, "shards": keep, "excluded_shards": excluded},
            what="serve the model without the excluded constituents",
        )
    for k in sorted(shards):
        destroy_constituent(run_dir, k)
    return Exclusion(run_dir, version, tuple(sorted(shards)))


def serve_by_exclusion(*, store: RequestStore, requests: list[Request], run_dir: Path, actor: str) -> Exclusion:
    """Exclude the constituents that ``requests`` wait on in ``run_dir`` and record it on each request.

    Each request's entry for the run becomes ``excluded`` with the version now served, its receipt is
    written (region and run), and ``erasure_served`` (served_by: exclusion) goes to both audit logs.
    """
    key = run_key(run_dir)
    waiting = [r for r in requests if key in r.runs and r.runs[key].status == PENDING]
    shards = {s for s in (r.runs[key].shard for r in waiting) if s is not None}
    if not shards:
        return Exclusion(Path(run_dir), None, ())
    outcome = exclude_shards(run_dir, shards)
    if outcome.version is None:
        return outcome
    stamp = now()
    for req in waiting:
        entry = req.runs[key]
        entry.status = EXCLUDED
        entry.model_version_after = entry.excluded_at_version = outcome.version
        entry.served_at = stamp
        entry.note = (
            f"served by exclusion at version {outcome.version}: constituent {entry.shard} is no longer "
            "served and its weights and checkpoints were overwritten and deleted; a retrain without "
            "the customer will serve it again"
        )
        store.save(req)
        details = {
            "request_id": req.request_id,
            "kind": req.kind,
            "region": req.region,
            "run": Path(run_dir).name,
            "shard": entry.shard,
            "model_version": outcome.version,
            "served_by": "exclusion",
        }
        region_log = region_audit_log(store.state_dir)
        # Audited before the receipt, so that the receipt's head covers this very entry.
        region_log.append(
            actor=actor, action=AuditAction.ERASURE_SERVED, details={**details, "customer": req.customer_ref}
        )
        server_audit_log(Path(run_dir)).append(actor=SERVER_ACTOR, action=AuditAction.ERASURE_SERVED, details=details)
        record_receipt(run_dir, req, region_audit_head=region_log.head())
    return outcome


def serve_on_runs(*, store: RequestStore, requests: list[Request], run_dirs: list[Path], actor: str) -> list[Exclusion]:
    """After the requests are recorded: per run, mark the constituents stale, give receipts for the
    customers it never trained on, and serve the rest by exclusion where the run has constituents left.
    """
    out = []
    for run_dir in run_dirs:
        key = run_key(run_dir)
        mine = [r for r in requests if key in r.runs]
        entries = [
            {"region": r.region, "request_id": r.request_id, "shard": r.runs[key].shard}
            for r in mine
            if r.runs[key].open
        ]
        if entries:  # the server's side learns a shard and a random request id, nothing derived from the id
            mark_stale(run_dir, entries)
        for r in mine:
            if r.runs[key].status == NOT_TRAINED:
                record_receipt(run_dir, r)
        out.append(serve_by_exclusion(store=store, requests=mine, run_dir=run_dir, actor=actor))
    return out
