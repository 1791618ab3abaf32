"""Serving erasures on a run: retrain only the stale constituents, then publish, shred and give receipts.

The retrain is an ordinary federated run of the stale shards (same config, constituent k starts from the
public init ``seed*1000+k``, every region draws fresh randomness for every release: a retrain never
shares the old constituent's noise), written
into a staging folder ``RUN_DIR/.retrain-vN`` while the old model stays served. Only when it has
finished with every region taking part is it committed: the new constituents and checkpoints replace the
old ones (whose bytes are overwritten, not just unlinked), ``model/model.json`` gets version N, and each
request gets its receipt. Every commit step is idempotent, so a crash at any point leaves the requests
pending and ``fedcrm retrain RUN_DIR`` again finishes the job (from the staged result, when complete).

A retrain is a new DP release over the shard's remaining customers: each region charges it to its
ledger as it trains. Before anything starts, every region's budget is checked against the whole retrain
(all its rounds), so a retrain that a region would refuse half-way is refused up front instead.

This module has no Flower in it: the federated run is passed in (``simulate``, normally
:func:`fedcrm.fl.simulation.run_simulated`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import load_schema
from fedcrm.durable import append_line, write_json_atomically
from fedcrm.errors import FedcrmError, PolicyError, PrivacyBudgetError, StorageError, UnlearningError
from fedcrm.governance.policy import DEFAULT_DELTA
from fedcrm.governance.request_store import (
    SERVED,
    Request,
    RequestStore,
    RunEntry,
    now,
    record_receipt,
    retrained_ids,
    run_key,
)
from fedcrm.node_settings import region_settings
from fedcrm.privacy.accountant import GaussianRelease
from fedcrm.privacy.client_dp import client_dp_release
from fedcrm.region import Region
from fedcrm.region_surface import check_declared_shard
from fedcrm.run_summary import RunSummary
from fedcrm.runs import CONFIG_FILE, ModelMeta, RunDir, load_weights
from fedcrm.unlearning.erasure import RunView
from fedcrm.unlearning.marker import RUN_MARKER, read_marker, write_marker
from fedcrm.unlearning.shred import destroy, discard_staging, swap_in

Simulate = Callable[..., RunSummary]  # fedcrm.fl.simulation.run_simulated
Report = Callable[[str], None]
READY = "READY.json"


def load_run_config(run_dir: Path) -> ExperimentConfig:
    if not (Path(run_dir) / CONFIG_FILE).exists():
        raise UnlearningError(f"{run_dir}: not a run folder (no config.yaml); give the folder `fedcrm run` wrote")
    return RunDir.open(Path(run_dir)).config


def model_version(run_dir: Path) -> int:
    if not ModelMeta.exists_in(run_dir):
        raise UnlearningError(f"{run_dir}: the run has no served model (model/model.json); finish the run first")
    return ModelMeta.read(run_dir).version


def run_view(run_dir: Path, *, region: str, state_root: Path) -> RunView:
    """Which of the region's customers a run trained on, and in which shard (read before tombstoning)."""
    cfg = load_run_config(run_dir)
    if region not in cfg.regions:
        raise UnlearningError(f"{run_dir}: region {region} is not one of the run's regions {sorted(cfg.regions)}")
    data = Region(region_settings(cfg, state_root=state_root)[region]).load(cfg, load_schema(cfg.schema_path))
    trained = {str(i): int(s) for i, s, h in zip(data.ids, data.shard, data.holdout, strict=True) if not h}
    return RunView(
        run_dir=Path(run_dir), shards=cfg.unlearning.shards, model_version=model_version(run_dir), trained=trained
    )


@dataclass
class Pending:
    """A request waiting on this run's retrain: its region, id and shard (from the marker or the store)."""

    region: str
    request_id: str
    shard: int


@dataclass
class RetrainPlan:
    run_dir: Path
    state_root: Path
    cfg: ExperimentConfig
    stale: list[int]
    pending: list[Pending]
    base_version: int
    target_version: int
    delta: float
    epsilon_before: dict[str, dict[int, float]]
    warnings: list[str] = field(default_factory=list)
    staged: bool = False

    @property
    def staging(self) -> Path:
        return self.run_dir / f".retrain-v{self.target_version}"


def _pending(run_dir: Path, cfg: ExperimentConfig, state_root: Path) -> list[Pending]:
    """The run's marker, plus (in simulation, where the region folders are here) the regions' own stores."""
    key = run_key(run_dir)
    served = retrained_ids(run_dir)
    found: dict[tuple[str, str], Pending] = {}
    for e in read_marker(run_dir)["stale"]:
        found[(e["region"], e["request_id"])] = Pending(e["region"], e["request_id"], int(e["shard"]))
    for region in cfg.regions:
        state_dir = Path(state_root) / region
        if not state_dir.exists():
            continue
        for req in RequestStore(state_dir, region=region).open_for(run_dir):
            shard = req.runs[key].shard
            if shard is not None and req.runs[key].shards == cfg.unlearning.shards:
                found[(region, req.request_id)] = Pending(region, req.request_id, shard)
    return [p for (_, rid), p in sorted(found.items()) if rid not in served]


def run_delta(run_dir: Path, cfg: ExperimentConfig) -> float:
    recorded = RunSummary.read(run_dir).delta() if RunSummary.exists_in(run_dir) else None
    return recorded or cfg.privacy.delta or DEFAULT_DELTA


def epsilon_by_region(plan: RetrainPlan) -> dict[str, dict[int, float]]:
    """ε of each stale shard at each region, from its ledger, at the run's δ (empty without DP)."""
    if plan.cfg.privacy.mode == "none":
        return {}
    from fedcrm.privacy.ledger import PrivacyLedger

    out: dict[str, dict[int, float]] = {}
    for region in plan.cfg.regions:
        state_dir = plan.state_root / region
        if not state_dir.exists():
            continue
        by_shard = PrivacyLedger.open(state_dir, region=region).epsilon_by_shard(
            shards=plan.cfg.unlearning.shards, delta=plan.delta, accountant=plan.cfg.privacy.accountant
        )
        out[region] = {k: by_shard.get(k, 0.0) for k in plan.stale}
    return out


def plan_retrain(run_dir: Path, *, state_root: Path) -> RetrainPlan:
    """What a retrain of ``run_dir`` would do now: which shards, which requests, which versions."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    pending = _pending(run_dir, cfg, Path(state_root))
    stale = sorted({p.shard for p in pending})
    bad = [k for k in stale if not 0 <= k < cfg.unlearning.shards]
    if bad:
        raise UnlearningError(
            f"{run_dir / RUN_MARKER}: shards {bad} do not exist in a run of "
            f"{cfg.unlearning.shards} shard(s); the marker does not belong to this run"
        )
    marker = read_marker(run_dir)
    attempt = marker.get("attempt") or {}
    base = int(attempt.get("base_version") or model_version(run_dir))
    plan = RetrainPlan(
        run_dir=run_dir,
        state_root=Path(state_root),
        cfg=cfg,
        stale=stale,
        pending=pending,
        base_version=base,
        target_version=base + 1,
        delta=run_delta(run_dir, cfg),
        epsilon_before={},
    )
    before = attempt.get("epsilon_before")
    if before and attempt.get("stale") == stale:
        plan.epsilon_before = {r: {int(k): v for k, v in e.items()} for r, e in before.items()}
        plan.staged = (plan.staging / READY).exists()
    else:
        plan.epsilon_before = epsilon_by_region(plan)
    if stale and cfg.unlearning.shards == 1:
        plan.warnings.append(
            "this run has a single shard (unlearning.shards = 1): serving the erasure retrains the WHOLE "
            "model, as long as the original training, and charges a full run's ε to every customer of "
            "every region. Train with unlearning.shards > 1 so that an erasure retrains one constituent."
        )
    if stale and len(stale) == cfg.unlearning.shards > 1:
        plan.warnings.append(f"every one of the {len(stale)} shards is stale: this retrain is a full retrain")
    if stale and cfg.privacy.mode == "none":
        plan.warnings.append("privacy.mode is none: the retrain releases its models without differential privacy")
    return plan


def retrain_releases(plan: RetrainPlan) -> dict[str, tuple[Region, dict[int, GaussianRelease]]]:
    """What each region would release for each stale shard: the whole retrain, all rounds, as one release.

    Each region plans σ exactly as it will when training (σ depends only on its shard's size, the batch
    size, the rounds and the target ε). A region that would refuse to take part raises here. Regions of a
    non-private run (privacy.mode none) release nothing the accountant can price: their dict is empty.
    """
    from fedcrm.training import sampling_plan  # torch's module: `forget` and `erasures` import this one without it

    cfg = plan.cfg
    schema = load_schema(cfg.schema_path)
    loaded: dict[str, tuple[Region, Any]] = {}
    for region, settings in region_settings(cfg, state_root=plan.state_root).items():
        try:
            r = Region(settings)
            r.check_request(cfg, schema)
            loaded[region] = (r, r.load(cfg, schema))
        except PolicyError as e:
            raise UnlearningError(f"region {region} refuses the erasure retrain: {e}") from e
        except FedcrmError as e:
            raise UnlearningError(f"region {region} cannot take part in the erasure retrain: {e}") from e
    out: dict[str, tuple[Region, dict[int, GaussianRelease]]] = {}
    for region, (r, _data) in loaded.items():
        releases: dict[int, GaussianRelease] = {}
        # As the region plans its rounds: from its declared size (a count of the shard would move with
        # the erasure itself), refused on it as a round would be.
        declared = r.declared_shard(cfg, schema)
        for k in plan.stale:
            try:
                check_declared_shard(r.policy, region=region, shard=k, declared=declared)
            except PolicyError as e:
                raise UnlearningError(f"region {region} refuses the erasure retrain: {e}") from e
            if cfg.privacy.mode == "sample_dp":
                q, steps = sampling_plan(
                    n=declared, batch_size=cfg.training.batch_size, epochs=cfg.training.local_epochs
                )
                releases[k] = GaussianRelease(r.noise_multiplier(cfg, n=declared), q, steps * cfg.training.rounds)
            elif cfg.privacy.mode != "none":
                # Client-level DP: each customer sees σ/2 (their removal moves the clipped update by 2C).
                release = client_dp_release(
                    server_noise_multiplier=cfg.privacy.client_noise_multiplier, rounds=cfg.training.rounds
                )
                if isinstance(release, GaussianRelease):
                    releases[k] = release
        out[region] = (r, releases)
    return out


def check_retrain_budget(plan: RetrainPlan) -> None:
    """Refuse, before anything is trained or spent, a retrain that a region's policy or budget would refuse:
    every region's whole retrain (:func:`retrain_releases`) checked against its ledger."""
    cfg = plan.cfg
    for region, (r, releases) in retrain_releases(plan).items():
        for k, release in releases.items():
            try:
                r.ledger.check_budget(
                    budget=r.policy.privacy_budget,
                    delta=r.delta,
                    accountant=r.policy.accountant,
                    shard=k,
                    shards=cfg.unlearning.shards,
                    next_release=release,
                )
            except PrivacyBudgetError as e:
                raise PrivacyBudgetError(
                    f"region {region} refuses the erasure retrain of shard {k}: its {cfg.training.rounds} rounds "
                    f"would exceed the region's privacy budget. {e} The old model (version {plan.base_version}) "
                    "stays served and the request(s) stay pending; the customers are already tombstoned, so no "
                    "new training uses them. Reserve budget for erasures (README: 'Right to erasure')."
                ) from None


# -- the retrain -------------------------------------------------------------------------------------


@dataclass
class RetrainResult:
    run_dir: Path
    stale: list[int]
    model_version: int
    receipts: list[dict[str, Any]]
    warnings: list[str]
    summary: RunSummary | None
    resumed: bool = False


def retrain(run_dir: Path, *, state_root: Path, simulate: Simulate, report: Report = print) -> RetrainResult:
    """Retrain the run's stale constituents and serve its pending erasures (see the module docstring)."""
    plan = plan_retrain(run_dir, state_root=state_root)
    for w in plan.warnings:
        report(f"[warning] {w}")
        warnings.warn(w, stacklevel=2)
    if not plan.stale:
        return RetrainResult(Path(run_dir), [], model_version(run_dir), [], plan.warnings, None)
    resumed = plan.staged
    if not plan.staged:
        check_retrain_budget(plan)
        discard_staging(plan.staging)  # a crashed attempt's partial output
        s = plan.cfg.unlearning.shards
        initial = {
            k: load_weights(plan.run_dir / "model" / f"constituent-{k}.npz") for k in range(s) if k not in plan.stale
        }
        marker = read_marker(plan.run_dir)
        marker["attempt"] = {
            "base_version": plan.base_version,
            "target_version": plan.target_version,
            "stale": plan.stale,
            "epsilon_before": plan.epsilon_before,
            "started_at": now(),
        }
        write_marker(plan.run_dir, marker)
        report(
            f"retraining shard(s) {plan.stale} of {s} for {len(plan.pending)} request(s): "
            f"model version {plan.base_version} -> {plan.target_version}"
        )
        try:
            summary = simulate(
                plan.cfg,
                run_dir=plan.staging,
                state_root=plan.state_root,
                report=report,
                shards=plan.stale,
                initial=initial,
                model_version=plan.target_version,
            )
        except Exception as e:
            raise UnlearningError(
                f"the retrain of {plan.run_dir} failed ({type(e).__name__}: {e}). The old model (version "
                f"{plan.base_version}) is still served and the request(s) stay pending: fix the cause and run "
                f"`fedcrm retrain {plan.run_dir}` again."
            ) from e
        _check_complete(plan, summary)
        write_json_atomically(
            plan.staging / READY,
            {"target_version": plan.target_version, "stale": plan.stale, "finished_at": now()},
            what="mark the staged retrain complete",
        )
    receipts = commit(plan)
    summary = RunSummary.read(plan.run_dir)
    return RetrainResult(plan.run_dir, plan.stale, plan.target_version, receipts, plan.warnings, summary, resumed)


def _check_complete(plan: RetrainPlan, summary: RunSummary) -> None:
    """An erasure retrain must be the same federation as the original: every region, every round."""
    problems = summary.problems()
    if problems:
        kind = PrivacyBudgetError if any("budget" in str(v) for v in problems.values()) else UnlearningError
        raise kind(
            "the erasure retrain did not complete with every region: "
            + "; ".join(f"{r}: {why}" for r, why in sorted(problems.items()))
            + f". Its result is discarded: the old model (version {plan.base_version}) stays served and the "
            "request(s) stay pending."
        )


def commit(plan: RetrainPlan) -> list[dict[str, Any]]:
    """Publish the staged retrain; every step can run again after a crash without harm."""
    run_dir, staging = plan.run_dir, plan.staging
    if not (staging / READY).exists():
        raise StorageError(f"{staging}: no finished retrain to commit")
    for k in plan.stale:
        swap_in(staging / "model" / f"constituent-{k}.npz", run_dir / "model" / f"constituent-{k}.npz")
        for new in sorted((staging / "checkpoints").glob(f"round-*-shard-{k}.npz")):
            swap_in(new, run_dir / "checkpoints" / new.name)
        fresh = {f"round-{r:04d}-shard-{k}.npz" for r in range(1, plan.cfg.training.rounds + 1)}
        for old in sorted((run_dir / "checkpoints").glob(f"round-*-shard-{k}.npz")):
            if old.name not in fresh:  # an old checkpoint the retrain did not overwrite
                destroy(old)
    _append_metrics(plan)
    swap_in(staging / "model" / "model.json", run_dir / "model" / "model.json")  # the new version is served
    if RunSummary.exists_in(staging):
        RunDir(path=run_dir, config=plan.cfg).write_summary(RunSummary.read(staging).with_retrained(plan.stale))
        RunSummary.path_in(staging).unlink()
    if (staging / "audit.log").exists():
        os.replace(staging / "audit.log", run_dir / f"audit-retrain-v{plan.target_version}.log")
    receipts = _serve_requests(plan)
    marker = read_marker(run_dir)
    done = {(p.region, p.request_id) for p in plan.pending}
    marker["stale"] = [e for e in marker["stale"] if (e["region"], e["request_id"]) not in done]
    marker["attempt"] = None
    if marker["stale"]:
        write_marker(run_dir, marker)
    else:
        (run_dir / RUN_MARKER).unlink(missing_ok=True)
    discard_staging(staging)
    return receipts


def _append_metrics(plan: RetrainPlan) -> None:
    staged = plan.staging / "metrics.jsonl"
    if not staged.exists():
        return
    target = plan.run_dir / "metrics.jsonl"
    for line in staged.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            append_line(
                target,
                json.dumps({**row, "model_version": plan.target_version, "retrain": True}),
                what="append the retrain's metrics",
            )
    staged.unlink()  # moved: a re-run after a crash does not append twice


def _serve_requests(plan: RetrainPlan) -> list[dict[str, Any]]:
    """Mark every request the retrain served as served (idempotent), with receipts and audit events."""
    from fedcrm.governance.audit_log import AuditAction
    from fedcrm.governance.audit_trail import SERVER_ACTOR, node_actor, region_audit_log, server_audit_log

    eps_after = epsilon_by_region(plan)
    key = run_key(plan.run_dir)
    stamp = now()
    receipts: list[dict[str, Any]] = []
    for p in plan.pending:
        state_dir = plan.state_root / p.region
        store = RequestStore(state_dir, region=p.region) if state_dir.exists() else None
        before = plan.epsilon_before.get(p.region, {}).get(p.shard)
        after = eps_after.get(p.region, {}).get(p.shard)
        if store is None or not store.exists(p.request_id):
            # Known only from the marker (the region's store is on its own machine): the run's history
            # records what the run knows, in the same receipt format.
            req = Request(
                request_id=p.request_id,
                kind="unknown",
                region=p.region,
                customer_ref="",
                requested_at="",
                requested_by="",
                deadline="",
                recorded_at=stamp,
                runs={
                    key: RunEntry(
                        shard=p.shard,
                        shards=plan.cfg.unlearning.shards,
                        status=SERVED,
                        model_version_before=plan.base_version,
                        model_version_after=plan.target_version,
                        served_at=stamp,
                        epsilon_before=before,
                        epsilon_after=after,
                    )
                },
            )
            receipts.append(record_receipt(plan.run_dir, req))
            continue
        req = store.get(p.request_id)
        entry = req.runs[key]
        first = entry.open
        if first:
            how = (
                f"first served by exclusion at version {entry.excluded_at_version}; "
                if entry.excluded_at_version
                else ""
            )
            entry.status = SERVED
            entry.model_version_before = entry.model_version_before or plan.base_version
            entry.model_version_after = plan.target_version
            entry.served_at = stamp
            entry.epsilon_before, entry.epsilon_after = before, after
            entry.note = (
                f"{how}shard {p.shard} retrained without the customer and served again at version "
                f"{plan.target_version}; the old constituent and its checkpoints were overwritten and "
                "deleted"
            )
            store.save(req)
        region_log = region_audit_log(state_dir)
        if first:  # audited before the receipt, so that the receipt's head covers this very entry
            details = {
                "request_id": req.request_id,
                "kind": req.kind,
                "customer": req.customer_ref,
                "region": p.region,
                "run": plan.run_dir.name,
                "shard": p.shard,
                "model_version": plan.target_version,
                "served_by": "retrain",
                "epsilon_before": before,
                "epsilon_after": after,
            }
            region_log.append(actor=node_actor(p.region), action=AuditAction.ERASURE_SERVED, details=_finite(details))
            server_audit_log(plan.run_dir).append(
                actor=SERVER_ACTOR,
                action=AuditAction.ERASURE_SERVED,
                details=_finite({k: v for k, v in details.items() if k != "customer"}),
            )
        receipts.append(record_receipt(plan.run_dir, req, region_audit_head=region_log.head()))
    return receipts


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    from fedcrm.governance.audit_trail import finite

    out: dict[str, Any] = finite(d)
    return out
