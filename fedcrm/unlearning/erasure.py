"""``forget``: a customer's erasure at their region, recorded, tombstoned and served by exclusion.

A request is served in steps that may be days apart and may crash in between:

1. ``forget`` (at the data owner's side): every id is checked against the region's table before
   anything is written; then one request per customer is written (pending, in the region's one request
   store, :mod:`fedcrm.governance.request_store`), the customers are tombstoned (from here on no load of
   the region's data sees them), the shard of every run that trained on them is marked stale in
   ``RUN_DIR/erasure_pending.json``, and each such run stops serving that constituent at once
   (:mod:`fedcrm.unlearning.exclusion`; with S = 1 there is nothing to fall back on and the request
   waits for the retrain). Re-running after a crash finishes what was started; a customer already
   forgotten is refused.
2. ``fedcrm retrain RUN_DIR`` (:mod:`fedcrm.unlearning.retrain`) retrains the stale constituents,
   serves them again, and marks the requests served, with a receipt per request.

What is stored where: the region's state folder holds the requests, which carry the customer's
keyed reference (the audit log's HMAC, never the id) and a keyed shard hash that lets a later run with
any number of shards find the customer's shard. The run folder (the server's side) learns only a shard
index and a random request id, never anything derived from the id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcrm.errors import UnlearningError
from fedcrm.governance.request_store import (
    DEFAULT_DEADLINE_DAYS,
    ERASURE,
    NOT_TRAINED,
    PENDING,
    Request,
    RequestStore,
    RunEntry,
    now,
    run_key,
)

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
    deadline_days: int = DEFAULT_DEADLINE_DAYS,
) -> list[Request]:
    """Tombstone the customers and mark the runs' constituents that trained on them stale.

    ``table_ids`` are the ids in the region's current table (tombstoned ones included); ``runs`` say
    which customers each run trained on (see :func:`fedcrm.unlearning.retrain.run_view`). All ids are
    checked before anything is written: an unknown id or one already forgotten refuses the whole call.
    A request whose tombstoning did not complete (a crash) is completed rather than refused.
    """
    from fedcrm.data.split import stable_hash
    from fedcrm.governance.audit_log import AuditAction
    from fedcrm.governance.audit_trail import region_audit_log
    from fedcrm.unlearning.exclusion import serve_on_runs
    from fedcrm.unlearning.shards import region_secret
    from fedcrm.unlearning.tombstones import Tombstones

    ids = list(dict.fromkeys(str(i).strip() for i in customer_ids))
    if not ids or any(not i for i in ids):
        raise UnlearningError("give at least one non-empty customer id (--customer-id ID or --file ids.txt)")
    tombstones = Tombstones(state_dir)
    store = RequestStore(state_dir, region=region)
    audit = region_audit_log(state_dir)
    known = {str(i) for i in table_ids}
    existing = {r.customer_ref: r for r in store.all(kind=ERASURE)}
    already = [i for i in ids if tombstones.contains(i)]
    if already:
        refs = [existing[r].request_id for i in already for r in audit.customer_refs(i) if r in existing]
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
    requests: list[Request] = []
    for cid in ids:
        ref = audit.customer_ref(cid)
        # A request made before the region's key took over is stored under the log's legacy reference.
        req = next((existing[r] for r in audit.customer_refs(cid) if r in existing), None)
        if req is None:
            req = Request.new(
                kind=ERASURE,
                region=region,
                customer_ref=ref,
                actor=actor,
                deadline_days=deadline_days,
                shard_key=stable_hash(cid, key=f"shard:{secret}"),
            )
        for view in runs:
            key = run_key(view.run_dir)
            if key in req.runs:
                continue
            shard = view.trained.get(cid)
            if shard is None:
                req.runs[key] = RunEntry(
                    shard=None,
                    shards=view.shards,
                    status=NOT_TRAINED,
                    model_version_before=view.model_version,
                    model_version_after=view.model_version,
                    served_at=now(),
                    note="the run never trained on this customer (hold-out or no consent): no constituent to retrain",
                )
            else:
                req.runs[key] = RunEntry(
                    shard=shard, shards=view.shards, status=PENDING, model_version_before=view.model_version
                )
        store.save(req)  # pending, durable before the tombstone
        requests.append(req)

    tombstones.add(ids)
    stamp = now()
    for req in requests:
        if req.recorded_at is None:
            req.recorded_at = stamp
            store.save(req)
            audit.append(
                actor=actor,
                action=AuditAction.ERASURE_REQUESTED,
                details={
                    "request_id": req.request_id,
                    "customer": req.customer_ref,
                    "region": region,
                    "stale": [
                        {"run": Path(k).name, "shard": r.shard} for k, r in req.runs.items() if r.status == PENDING
                    ],
                },
            )
    serve_on_runs(store=store, requests=requests, run_dirs=[v.run_dir for v in runs], actor=actor)
    return requests
