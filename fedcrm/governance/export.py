"""A customer's copy of their data (portability): what the region holds and what was done with it.

The export is built at the region, from the region's own table and state, and handed to the data owner
to pass on; nothing of it crosses the federation. Its structure is versioned (``FORMAT``/``VERSION``) and
described by ``schemas/export-v1.schema.json``:

- ``record``: the customer's row as the region stores it, only the schema's columns, as text;
- ``features``: the encoded features the models saw (names from :class:`FeatureEncoder`);
- ``consent``: per purpose, the table's consent column, any recorded withdrawal, and the result;
- ``models``: per run given, whether their data trained it (their shard, whether they were held out),
  their current score from the served model and a short explanation of it;
- ``history``: the region's audit log entries about this customer (erasure, consent, exports), in
  which the customer appears only as a keyed hash.

The CSV form is the same document flattened: one row per leaf, ``field`` its JSON path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table, read_raw
from fedcrm.data.schema import Schema
from fedcrm.durable import storage_error, write_text_atomically
from fedcrm.errors import DataError, UnlearningError
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.customer_refs import RegionAuditLog
from fedcrm.governance.request_store import CONSENT_WITHDRAWAL, ERASURE, PENDING, Request, RequestStore, run_key
from fedcrm.run_summary import RunSummary
from fedcrm.runs import MODEL_META, ModelMeta, RunDir
from fedcrm.unlearning.shards import holdout_mask, region_secret, shard_of
from fedcrm.unlearning.tombstones import Tombstones

if TYPE_CHECKING:
    import torch

FORMAT = "fedcrm-customer-export"
VERSION = 1
SCHEMA_FILE = "export-v1.schema.json"
FORMATS = ("json", "csv")


@dataclass(frozen=True)
class ExportRequest:
    """Where the customer's data lives at the region, and which runs' models to report on."""

    region: str
    customer_id: str
    data_path: Path
    schema: Schema
    schema_path: Path
    state_dir: Path
    runs: tuple[Path, ...] = ()


def build_export(request: ExportRequest, *, audit: RegionAuditLog) -> dict[str, Any]:
    """The export document; UnlearningError for a forgotten customer, DataError for an unknown one."""
    cid = request.customer_id
    refs = set(audit.customer_refs(cid))
    requests = [r for r in RequestStore(request.state_dir, region=request.region).all() if r.customer_ref in refs]
    tombstones = Tombstones(request.state_dir)
    if tombstones.contains(cid):
        # Forgotten here, but a model trained before the erasure holds what it learnt until it is retrained.
        open_runs = sorted({Path(k).name for r in requests if r.kind == ERASURE for k, e in r.runs.items() if e.open})
        still = (
            f"; the served model of run(s) {', '.join(open_runs)} still holds what it learnt from them until "
            f"`fedcrm retrain` serves the erasure"
            if open_runs
            else ""
        )
        raise UnlearningError(
            f"region {request.region}: customer {cid} was forgotten (erased) here; the region keeps no data "
            f"about them to export, only a keyed hash that keeps them out of later imports{still}"
        )
    table = load_table(request.data_path, request.schema)
    where = np.flatnonzero(table.ids == cid)
    if len(where) == 0:
        raise DataError(
            f"region {request.region}: no customer with id {cid!r} in the table (check the id and the region; "
            f"rows dropped by the schema's missing-value policy cannot be exported either)",
            path=str(request.data_path),
        )
    one = table.subset(np.isin(np.arange(len(table)), where))
    line = int(one.lines[0])
    raw = read_raw(request.data_path, request.schema)
    record = {c: str(v) for c, v in raw.iloc[line - 2].items()}

    encoder = FeatureEncoder(request.schema)
    x = encoder.encode(one)
    features = [{"name": s.name, "column": s.column, "value": float(x[0, j])} for j, s in enumerate(encoder.slots)]
    withdrawals = ConsentWithdrawals(request.state_dir)
    consent: list[dict[str, Any]] = []
    for purpose in request.schema.purposes:
        spec = request.schema.consent_for(purpose)
        in_table = bool(one.consent[purpose].iloc[0]) if spec is not None else None
        withdrawn = withdrawals.contains(cid, purpose=purpose)
        consent.append(
            {
                "purpose": purpose,
                "column": spec.column if spec is not None else None,
                "in_table": in_table,
                "withdrawn": withdrawn,
                "effective": (in_table is not False) and not withdrawn,
            }
        )
    effective = {str(c["purpose"]): bool(c["effective"]) for c in consent}
    table_consent = {str(c["purpose"]): c["in_table"] is not False for c in consent}
    secret = region_secret(request.state_dir)
    models = [
        _model_entry(
            run,
            request=request,
            x=x,
            consent=(effective, table_consent),
            requests=requests,
            secret=secret,
            names=encoder.feature_names,
        )
        for run in request.runs
    ]
    ref = audit.customer_ref(cid)
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "region": request.region,
        "customer_id": cid,
        "customer_ref": ref,
        "schema": {"name": request.schema.name, "sha256": hashlib.sha256(request.schema_path.read_bytes()).hexdigest()},
        "record": {"line": line, "columns": record},
        "features": features,
        "consent": consent,
        "models": models,
        "history": _history(audit, cid),
        "notes": [
            "record: the row as stored, columns the schema declares only; other columns are never read.",
            "features: values in [0, 1] computed from the schema's declared bounds and vocabularies.",
            "models.trained_on_their_data says whether the served model was trained on their data: a "
            "withdrawal or erasure takes effect from the retrain or run that follows it; until then "
            "models.awaiting_request names the request it awaits.",
            "history: the customer appears in the audit log only as customer_ref, a keyed hash under the "
            "region's secret.",
        ],
    }


def run_config(run: Path) -> ExperimentConfig:
    """The resolved config a run folder was trained with."""
    return RunDir.open(run, schema_required=False).config  # the export encodes with the request's schema


def _awaiting(requests: list[Request], *, run: Path, task: str, started: float | None) -> str | None:
    """The customer's withdrawal (of ``task``) or erasure that ``run``'s served model has not caught up with:
    its constituent awaits a retrain, or the run trained before the request and no request named it."""
    key = run_key(run)
    for req in requests:
        if req.kind == CONSENT_WITHDRAWAL and req.purpose != task:
            continue
        entry = req.runs.get(key)
        if entry is not None:
            if entry.status == PENDING:  # excluded, served or never trained: the served model is without them
                return req.request_id
        elif (
            req.recorded_at is not None
            and started is not None
            and datetime.fromisoformat(req.recorded_at).timestamp() > started
        ):
            return req.request_id
    return None


def _model_entry(
    run: Path,
    *,
    request: ExportRequest,
    x: np.ndarray,
    consent: tuple[dict[str, bool], dict[str, bool]],
    requests: list[Request],
    secret: str,
    names: list[str],
) -> dict[str, Any]:
    """``consent``: per purpose, today's effective consent and the table's (before any withdrawal)."""
    cfg = run_config(run)
    meta = ModelMeta.read(run)
    if meta.feature_names != names:
        raise DataError(
            f"{run / MODEL_META}: the model was trained on other features than schema {request.schema.name} encodes; "
            f"give the run's own schema"
        )
    summary = RunSummary.read(run) if RunSummary.exists_in(run) else None
    ids = np.asarray([request.customer_id], dtype=object)
    shard = int(shard_of(ids, shards=cfg.unlearning.shards, secret=secret)[0])
    held_out = bool(holdout_mask(ids, fraction=cfg.evaluation.holdout_fraction, secret=secret)[0])
    in_run = request.region in cfg.regions
    effective, in_table = consent
    consent_ok = effective.get(cfg.task, False)
    awaiting = _awaiting(requests, run=run, task=cfg.task, started=summary.started if summary is not None else None)
    # A pending withdrawal gates later loads only: the served model was trained while the table said yes.
    trained = in_run and not held_out and (consent_ok or (awaiting is not None and in_table.get(cfg.task, False)))
    # Imported here: torch is for a run's model; an export without --run never loads one.
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.models import predict_proba

    models = ServedModel.load(run).models
    scores = [float(predict_proba(m, x)[0]) for m in models]
    return {
        "run_dir": str(run.resolve()),
        "run_id": summary.run_id if summary is not None else None,
        "name": cfg.name,
        "task": cfg.task,
        "model_version": meta.version,
        "model_kind": meta.kind,
        "region_in_run": in_run,
        "shards": cfg.unlearning.shards,
        "shard": shard,
        "in_holdout": held_out,
        "consent_for_task": consent_ok,
        "trained_on_their_data": bool(trained),
        "awaiting_request": awaiting if trained else None,
        "score": float(np.mean(scores)),
        "constituent_scores": scores,
        "explanation": explain(models, x=x[0], names=names, kind=meta.kind),
    }


def explain(
    models: list[torch.nn.Module], *, x: np.ndarray, names: list[str], kind: str, top: int = 3
) -> dict[str, Any]:
    """Per-feature contributions to the mean of the constituents' logits (the score is its sigmoid for S = 1).

    Logistic: exact, ``w_i * x_i`` plus the bias. MLP: gradient × input of the logit, a first-order
    attribution that need not add up to the logit.
    """
    import torch  # only with a model to explain: see _model_entry

    from fedcrm.models import get_weights

    xt = torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(0)
    if kind == "logistic":
        weights = [get_weights(m) for m in models]
        w = np.mean([wt["out.weight"][0] for wt in weights], axis=0)
        bias = float(np.mean([float(wt["out.bias"][0]) for wt in weights]))
        contrib = w.astype(np.float64) * x.astype(np.float64)
        method = "exact: logit = baseline + sum of w_i * x_i (mean over the served model's constituents)"
        baseline: float | None = bias
    else:
        xt.requires_grad_(True)
        logit = torch.stack([m(xt).squeeze() for m in models]).mean()
        (grad,) = torch.autograd.grad(logit, xt)
        contrib = (grad[0] * xt[0]).detach().numpy().astype(np.float64)
        method = "gradient x input of the mean logit of the constituents (a first-order approximation)"
        baseline = None
    with torch.no_grad():
        logit_value = float(np.mean([float(m(xt.detach()).squeeze()) for m in models]))
    order = np.argsort(-np.abs(contrib), kind="stable")
    contributions = [{"feature": names[j], "value": float(x[j]), "contribution": float(contrib[j])} for j in order]
    parts = [
        f"{c['feature']} ({'raises' if c['contribution'] > 0 else 'lowers'} the score by "
        f"{abs(c['contribution']):.2f} in logit units)"
        for c in contributions[:top]
        if c["contribution"] != 0
    ]
    return {
        "method": method,
        "logit": logit_value,
        "baseline": baseline,
        "contributions": contributions,
        "summary": ("Most influential: " + "; ".join(parts) + ".") if parts else "No feature moved the score.",
    }


def _history(audit: RegionAuditLog, customer_id: str) -> list[dict[str, Any]]:
    """The region's audit entries about this customer (only intact chains are read), under today's key
    and, for entries written before the region's key took over, the log's legacy salt."""
    return [
        {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action, "details": e.details}
        for e in audit.entries_about(customer_id)
    ]


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, "" if obj is None else json.dumps(obj) if isinstance(obj, bool) else str(obj)


def render(document: dict[str, Any], *, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["field", "value"])
        w.writerows(_flatten(document))
        return buf.getvalue()
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def write_export(text: str, out: Path) -> None:
    """Write atomically and private to the owner (0600): the file appears whole or not at all."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(out.parent, "create the export's folder", exc) from None
    write_text_atomically(out, text, what="write the export", mode=0o600)
