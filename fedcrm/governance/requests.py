"""Serving a customer's requests at their region: consent withdrawal and export, each audited.

Each request is checked completely before anything is written, so a refused request leaves no file
and no state behind; what is served is recorded in the region's audit log under the operator's name
with the customer as a salted hash only.

A consent withdrawal is served like an erasure for that purpose's models: the withdrawal is recorded
durably (it gates every later load, see :class:`~fedcrm.governance.consent.ConsentWithdrawals`), the
constituents that trained on the customer are marked stale in ``<state>/pending_requests.jsonl`` for the
next retrain, and a receipt is written to ``<state>/receipts/``. The runs given are also marked stale
in their own folder (:func:`fedcrm.unlearning.erasure.mark_stale`), so ``fedcrm retrain RUN_DIR`` retrains
them and records the withdrawal as served in the run's history.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.errors import ConfigError, UnlearningError
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import region_audit_log
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.export import FORMATS, ExportRequest, build_export, render, run_config, write_export
from fedcrm.unlearning.erasure import mark_stale
from fedcrm.unlearning.shards import holdout_mask, region_secret, shard_of
from fedcrm.unlearning.tombstones import Tombstones

PURPOSES: tuple[str, ...] = typing.get_args(ExperimentConfig.model_fields["task"].annotation)
PENDING_FILE = "pending_requests.jsonl"
RECEIPTS_DIR = "receipts"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _append_line(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _stale_constituents(
    runs: tuple[Path, ...], *, region: str, customer_id: str, purpose: str, secret: str
) -> list[dict[str, Any]]:
    """The constituents of the given runs that this customer's data trained for ``purpose``.

    A run of another purpose or without this region is untouched; so is one where the customer was held
    out or (when the run's table for this region is readable here) had not consented in the table.
    """
    out = []
    ids = np.asarray([customer_id], dtype=object)
    for run in runs:
        cfg = run_config(run)
        if cfg.task != purpose or region not in cfg.regions:
            continue
        if holdout_mask(ids, fraction=cfg.evaluation.holdout_fraction, secret=secret)[0]:
            continue
        if not _consented_in_table(cfg, region=region, customer_id=customer_id):
            continue
        shard = int(shard_of(ids, shards=cfg.unlearning.shards, secret=secret)[0])
        meta = run / "model" / "model.json"
        version = json.loads(meta.read_text(encoding="utf-8")).get("version") if meta.exists() else None
        out.append({"run_dir": str(run.resolve()), "shard": shard, "shards": cfg.unlearning.shards,
                    "model_version": version})
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
    *, state_dir: Path, region: str, customer_id: str, purpose: str, actor: str, runs: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Record the withdrawal, mark the affected constituents stale, write and return the receipt."""
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
    stale = _stale_constituents(
        runs, region=region, customer_id=customer_id, purpose=purpose, secret=region_secret(state_dir)
    )
    audit = region_audit_log(state_dir)
    ref = audit.customer_ref(customer_id)
    request_id = f"consent-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    requested = _now()
    withdrawals.add(customer_id, purpose=purpose)  # durable first: from here on no load uses them
    receipt = {
        "request_id": request_id,
        "kind": "consent_withdrawal",
        "region": region,
        "customer_ref": ref,
        "purpose": purpose,
        "requested": requested,
        "recorded": _now(),
        "requested_by": actor,
        "excluded_from": f"every later training and evaluation for purpose `{purpose}` at region {region}",
        "stale_constituents": stale,
        "status": "pending_retrain" if stale else "recorded",
        "note": "the constituents listed are retrained without the customer by the next `fedcrm retrain` "
        "of that run (or any new run), charged to the region's privacy ledger",
    }
    _append_line(state_dir / PENDING_FILE, {k: receipt[k] for k in ("request_id", "kind", "purpose", "customer_ref",
                                                                     "requested", "stale_constituents")})
    # The run folders learn only a shard and a random request id: `fedcrm retrain RUN_DIR` serves them.
    for s in stale:
        mark_stale(Path(s["run_dir"]), [{"region": region, "request_id": request_id, "shard": s["shard"]}])
    receipts = state_dir / RECEIPTS_DIR
    receipts.mkdir(parents=True, exist_ok=True)
    write_export(json.dumps(receipt, indent=2) + "\n", receipts / f"{request_id}.json")
    audit.append(
        actor=actor,
        action=AuditAction.CONSENT_WITHDRAWN,
        details={"request_id": request_id, "customer": ref, "purpose": purpose, "region": region,
                 "stale_constituents": [{"shard": s["shard"], "shards": s["shards"]} for s in stale]},
    )
    return receipt


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
