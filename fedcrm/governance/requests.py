"""Serving a customer's requests at their region: consent withdrawal and export, each audited.

Each request is checked completely before anything is written, so a refused request leaves no file
and no state behind; what is served is recorded in the region's audit log under the operator's name
with the customer as a keyed hash only.

A consent withdrawal is served like an erasure for that purpose's models (the same request store,
:mod:`fedcrm.governance.request_store`, with ``kind: consent_withdrawal``): the withdrawal is recorded
durably (it gates every later load), the constituents of the given runs that trained on the customer
are excluded from the served model at once where the run has other constituents
(:mod:`fedcrm.unlearning.exclusion`), marked stale for the next ``fedcrm retrain RUN_DIR``, and the
request gets a receipt.
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.errors import ConfigError, UnlearningError
from fedcrm.governance import request_store as rs
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import region_audit_log
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.export import FORMATS, ExportRequest, build_export, render, run_config, write_export
from fedcrm.runs import ModelMeta
from fedcrm.unlearning.exclusion import serve_on_runs
from fedcrm.unlearning.shards import holdout_mask, region_secret, shard_of
from fedcrm.unlearning.tombstones import Tombstones

PURPOSES: tuple[str, ...] = typing.get_args(ExperimentConfig.model_fields["task"].annotation)


def _run_entries(
    runs: tuple[Path, ...], *, region: str, customer_id: str, purpose: str, secret: str
) -> dict[str, rs.RunEntry]:
    """Per run of ``purpose`` with this region: the constituent this customer's data trained, if any.

    A run where the customer was held out or (when the run's table for this region is readable here)
    had not consented in the table never trained on them; a run of another purpose is untouched.
    """
    out: dict[str, rs.RunEntry] = {}
    ids = np.asarray([customer_id], dtype=object)
    for run in runs:
        cfg = run_config(run)
        if cfg.task != purpose or region not in cfg.regions:
            continue
        version = ModelMeta.read(run).version if ModelMeta.exists_in(run) else None
        shards = cfg.unlearning.shards
        held_out = bool(holdout_mask(ids, fraction=cfg.evaluation.holdout_fraction, secret=secret)[0])
        if held_out or not _consented_in_table(cfg, region=region, customer_id=customer_id):
            out[rs.run_key(run)] = rs.RunEntry(
                shard=None,
                shards=shards,
                status=rs.NOT_TRAINED,
                model_version_before=version,
                model_version_after=version,
                served_at=rs.now(),
                note="the run never trained on this customer (hold-out or no consent)",
            )
            continue
        shard = int(shard_of(ids, shards=shards, secret=secret)[0])
        out[rs.run_key(run)] = rs.RunEntry(shard=shard, shards=shards, status=rs.PENDING, model_version_before=version)
    return out


def _consented_in_table(cfg: ExperimentConfig, *, region: str, customer_id: str) -> bool:
    """False only when the run's table for the region is here and says the customer never consented."""
    path = Path(cfg.regions[region])
    schema = load_schema(cfg.schema_path) if cfg.schema_path.exists() else None
    if schema is None or not path.exists() or schema.consent_for(cfg.task) is None:
        return True
    table = load_table(path, schema)
    hit = np.flatnonzero(table.ids == customer_id)
    return len(hit) == 0 or bool(table.consent[cfg.task].to_numpy(dtype=bool)[hit[0]])


def withdraw_consent(
    *,
    state_dir: Path,
    region: str,
    customer_id: str,
    purpose: str,
    actor: str,
    runs: tuple[Path, ...] = (),
    deadline_days: int = rs.DEFAULT_DEADLINE_DAYS,
) -> rs.Request:
    """Record the withdrawal, serve the affected constituents by exclusion, return the request."""
    if purpose not in PURPOSES:
        raise ConfigError(f"--purpose must be one of {list(PURPOSES)}, got {purpose!r}")
    if not customer_id.strip():
        raise ConfigError("--customer-id must not be empty")
    if Tombstones(state_dir).contains(customer_id):
        raise UnlearningError(
            f"region {region}: customer {customer_id} was already forgotten: no model trains on them for any purpose"
        )
    withdrawals = ConsentWithdrawals(state_dir)
    if withdrawals.contains(customer_id, purpose=purpose):
        raise UnlearningError(
            f"region {region}: customer {customer_id} already withdrew consent to `{purpose}`; nothing changed"
        )
    entries = _run_entries(
        runs, region=region, customer_id=customer_id, purpose=purpose, secret=region_secret(state_dir)
    )
    audit = region_audit_log(state_dir)
    store = rs.RequestStore(state_dir, region=region)
    request = rs.Request.new(
        kind=rs.CONSENT_WITHDRAWAL,
        region=region,
        customer_ref=audit.customer_ref(customer_id),
        actor=actor,
        deadline_days=deadline_days,
        purpose=purpose,
        runs=entries,
    )
    withdrawals.add(customer_id, purpose=purpose)  # durable first: from here on no load uses them
    request.recorded_at = rs.now()
    store.save(request)
    audit.append(
        actor=actor,
        action=AuditAction.CONSENT_WITHDRAWN,
        details={
            "request_id": request.request_id,
            "customer": request.customer_ref,
            "purpose": purpose,
            "region": region,
            "stale_constituents": [
                {"shard": e.shard, "shards": e.shards} for e in entries.values() if e.status == rs.PENDING
            ],
        },
    )
    serve_on_runs(store=store, requests=[request], run_dirs=[r for r in runs if rs.run_key(r) in entries], actor=actor)
    return request


def serve_export(request: ExportRequest, *, out: Path, fmt: str, actor: str) -> dict[str, Any]:
    """Build, write and audit a customer's export; a refused request is audited and writes no file."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    audit = region_audit_log(request.state_dir)
    ref = audit.customer_ref(request.customer_id)
    try:
        document = build_export(request, audit=audit)
    except Exception as e:
        audit.append(
            actor=actor,
            action=AuditAction.EXPORT_REQUESTED,
            details={"customer": ref, "region": request.region, "outcome": "refused", "kind": type(e).__name__},
        )
        raise
    text = render(document, fmt=fmt)
    write_export(text, out)
    audit.append(
        actor=actor,
        action=AuditAction.EXPORT_SERVED,
        details={
            "customer": ref,
            "region": request.region,
            "format": fmt,
            "version": document["version"],
            "runs": [m["run_id"] for m in document["models"]],
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        },
    )
    return document
