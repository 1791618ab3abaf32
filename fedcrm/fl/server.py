"""The server's side of a run: pre-flight, one federated training per SISA constituent, the served
model's evaluation, and the run directory. The Flower ServerApp in ``server/`` only calls this.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcrm import wire
from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import Schema, load_schema
from fedcrm.errors import FederationError, federation_stopped
from fedcrm.fl.codec import extend, from_record, pack_constituents, plan_config, to_record
from fedcrm.fl.registry import NodeRegistry
from fedcrm.fl.strategy import (
    GuardedStrategy,
    RoundEvents,
    _status,
    build_strategy,
    pooled_evaluation,
    pooled_trust,
    screen_claims,
)
from fedcrm.governance.audit_trail import audited_run, server_audit_log
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.client_dp import AGAINST_SERVER
from fedcrm.run_summary import EVENT_KINDS, RunSummary
from fedcrm.runs import RunDir, code_version, completed_rounds, load_weights

log = logging.getLogger("fedcrm.server")
Report = Callable[[str], None]
CLIENT_DP_FEW_REGIONS = 20
AUC_NOISE_WARNING = 0.03  # above this, the run warns that the DP evaluation says little


def _wait_for_nodes(grid: Grid, *, expected: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.time() > deadline:
            return nodes
        time.sleep(0.2)


def _query(
    grid: Grid, nodes: list[int], config: ConfigRecord, *, arrays: ArrayRecord | None = None, timeout: float
) -> list[Message]:
    content = {wire.CONFIG: config} | ({wire.ARRAYS: arrays} if arrays is not None else {})
    msgs = [
        Message(content=RecordDict(dict(content)), dst_node_id=n, message_type=MessageType.QUERY)  # type: ignore[arg-type]
        for n in nodes
    ]
    return list(grid.send_and_receive(msgs, timeout=timeout))


def privacy_warnings(cfg: ExperimentConfig, *, regions: int) -> list[str]:
    out = []
    if cfg.privacy.mode == "none":
        out.append(
            "privacy.mode is none: the models are trained without differential privacy; model "
            "updates can reveal individual customers."
        )
    if cfg.privacy.mode == "client_dp" and regions < CLIENT_DP_FEW_REGIONS:
        out.append(
            f"client-level DP with only {regions} regions protects little: noise is calibrated to hide "
            "a whole region, so with few regions it either drowns the model or gives a large ε; and the "
            "server sees each region's clipped update before adding noise. Prefer sample_dp here."
        )
    if cfg.privacy.mode == "client_dp":
        out.append(
            "client-level DP: the server adds the noise, so each region's clipped update reaches the server "
            f"un-noised: ε against the server and its operator is {AGAINST_SERVER}. The regions' ledgers "
            "charge each customer at noise multiplier σ/2 (removing one customer moves their region's clipped "
            "update by up to 2C); that ε holds against other regions and the model's users, not against the "
            "server."
        )
    if cfg.privacy.mode != "none" and cfg.privacy.noise == "reproducible":
        out.append(
            "privacy.noise is reproducible: each region derives its noise from its own secret and a "
            "per-release nonce (research and tests). The server still cannot predict it, but anyone holding "
            "a region's state folder can regenerate that region's noise."
        )
    return out


def _epsilon_text(eps: dict[str, float], *, listed: int = 8) -> str:
    """ε per region for a progress line; with many regions, their range (metrics.jsonl has each)."""
    if len(eps) <= listed:
        return ", ".join(f"{r} {e:.2f}" for r, e in sorted(eps.items()))
    lowest, highest = min(eps, key=eps.__getitem__), max(eps, key=eps.__getitem__)
    return (
        f"{len(eps)} regions, {eps[lowest]:.2f} ({lowest}) to {eps[highest]:.2f} ({highest}), "
        f"median {statistics.median(eps.values()):.2f}"
    )


@dataclass
class Preflight:
    """What the pre-flight settled: the run's folder and id, the plan, and which regions take part."""

    run: RunDir
    run_id: str
    started: float  # Unix seconds: metrics.jsonl's time_s and the summary's wall time count from here
    plan: ConfigRecord
    schema: Schema
    feature_names: list[str]
    nodes: list[int]  # every node that connected
    excluded: set[int]  # nodes that refused, misclaimed or did not answer: never asked again
    described: dict[str, dict[str, float]]  # region -> its public figures (declared size, ε, δ, budget)
    refused: dict[str, str]  # region -> why it will not take part
    node_regions: dict[int, str]  # node id -> region, to name a region that later goes silent
    events: dict[str, dict[str, str]]  # refused / failed / rejected over the whole run: who -> why
    notes: list[str]  # warnings for the summary
    # region -> the largest ε its ledger reported during the run (pre-flight, every round's answers): the
    # ledger only grows, so this is its spend when a later answer (the final evaluation) is refused.
    spent: dict[str, float] = field(default_factory=dict)

    def saw_spent(self, region: str, epsilon: float | None) -> None:
        if epsilon is not None:
            self.spent[region] = max(epsilon, self.spent.get(region, 0.0))

    @property
    def taking_part(self) -> list[int]:
        return sorted(set(self.nodes) - self.excluded)


@dataclass
class ServedEvaluation:
    """The regions' DP answers about the served model, pooled."""

    per_region: dict[str, dict[str, float]]
    pooled: dict[str, float]
    suppressed: dict[str, str]  # regions left out of the pooled figures, and why
    trust: dict[str, Any]  # fairness per group, feature importance


def preflight(
    grid: Grid, cfg: ExperimentConfig, *, run_dir: Path, report: Report, resume: bool, registry: NodeRegistry | None
) -> Preflight:
    """Create (or reopen) the run folder, wait for the nodes, and let every region check the plan."""
    t0 = time.time()
    schema_text = cfg.schema_path.read_text(encoding="utf-8")
    schema = load_schema(cfg.schema_path)
    run = RunDir.create(run_dir, cfg)
    run_id = run.run_id(resume=resume, new=f"{cfg.name}-{uuid.uuid4().hex[:8]}")
    timeout = cfg.federation.round_timeout_s

    nodes = _wait_for_nodes(grid, expected=len(cfg.regions), timeout=min(timeout, 120))
    if len(nodes) < cfg.federation.min_regions:
        raise FederationError(
            f"only {len(nodes)} region node(s) connected, need federation.min_regions = {cfg.federation.min_regions}"
        )
    # Every region checks the plan against its policy and data, all at once.
    plan = plan_config(cfg, schema_text=schema_text, run_id=run_id)
    replies = _query(grid, nodes, extend(plan, {wire.ACTION: wire.ACTION_DESCRIBE}), timeout=timeout)
    answered = {m.metadata.src_node_id for m in replies}
    replies, misclaimed = screen_claims(replies, registry)
    described: dict[str, dict[str, float]] = {}
    refused: dict[str, str] = {}
    excluded: set[int] = set(nodes)
    node_regions: dict[int, str] = {}
    for msg in replies:
        region, outcome, reason = _status(msg)
        node_regions[msg.metadata.src_node_id] = region
        if outcome == wire.OUTCOME_OK:
            described[region] = {k: float(v) for k, v in msg.content[wire.METRICS].items()}  # type: ignore[arg-type]
            excluded.discard(msg.metadata.src_node_id)
        else:
            refused[region] = reason or outcome
    for region, reason in {**refused, **misclaimed}.items():
        report(f"[pre-flight] region {region} will not take part: {reason}")
    if len(described) < cfg.federation.min_regions:
        raise federation_stopped(
            f"pre-flight: {len(described)} region(s) can take part, fewer than federation.min_regions = "
            f"{cfg.federation.min_regions}: " + "; ".join(f"{r}: {why}" for r, why in refused.items()),
            refused=refused,
            others=bool(misclaimed) or answered != set(nodes),
        )
    notes = privacy_warnings(cfg, regions=len(described)) + (
        [] if registry is not None else ["no node registry: region names are the regions' own claims, unchecked"]
    )
    for note in notes:
        report(f"[warning] {note}")
    events: dict[str, dict[str, str]] = {"refused": dict(refused), "failed": {}, "rejected": dict(misclaimed)}
    for node in sorted(set(nodes) - answered):
        events["failed"][f"node-{node}"] = "no reply to the pre-flight within the round timeout"
    return Preflight(
        run=run,
        run_id=run_id,
        started=t0,
        plan=plan,
        schema=schema,
        feature_names=FeatureEncoder(schema).feature_names,
        nodes=nodes,
        excluded=excluded,
        described=described,
        refused=refused,
        node_regions=node_regions,
        events=events,
        notes=notes,
    )


def train_constituent(
    grid: Grid,
    cfg: ExperimentConfig,
    pre: Preflight,
    *,
    shard: int,
    offset: int,
    report: Report,
    registry: NodeRegistry | None,
) -> dict[str, np.ndarray]:
    """Federated training of constituent ``shard`` from round ``offset`` on (its checkpoint, or its init)."""
    run, t0 = pre.run, pre.started

    def on_round(rnd: int, ev: RoundEvents, per_region: dict[str, dict[str, float]], pooled: dict[str, float]) -> None:
        rnd += offset
        eps = {r: m["epsilon"] for r, m in ev.train.items()}
        run.append_metrics(
            {
                "round": rnd,
                "shard": shard,
                "time_s": round(time.time() - t0, 3),
                "pooled": pooled,
                "regions": per_region,
                "epsilon": eps,  # the regions that trained this round (their ledgers hold a release for it)
                "selected": ev.selected,  # the regions the server's sample asked to train (federation.fraction_train)
                "refused": ev.refused,
                "failed": ev.failed,
                "rejected": ev.rejected,
            }
        )
        for kind in EVENT_KINDS:
            pre.events[kind].update(getattr(ev, kind))
        for region, figures in (*ev.train.items(), *per_region.items()):
            pre.saw_spent(region, figures.get("epsilon"))
        eps_text = _epsilon_text(eps)
        shard_text = f" shard {shard + 1}/{cfg.unlearning.shards}" if cfg.unlearning.shards > 1 else ""
        quality = (
            f"  pooled AUC {pooled['auc']:.4f}  log-loss {pooled.get('log_loss', float('nan')):.4f}"
            if "auc" in pooled
            else ""
        )
        report(
            f"round {rnd:>3}/{cfg.training.rounds}{shard_text}:{quality}  ε spent: {eps_text or '-'}"
            f"  ({time.time() - t0:.1f}s)"
        )

    def checkpoint(rnd: int, arrays: ArrayRecord) -> None:
        if rnd > 0:
            run.save_checkpoint(round_=rnd + offset, shard=shard, weights=from_record(arrays))

    strategy = GuardedStrategy(
        build_strategy(cfg, regions=len(pre.described)),
        min_regions=cfg.federation.min_regions,
        max_update_norm=cfg.federation.max_update_norm,
        outlier_norm_ratio=cfg.federation.outlier_norm_ratio,
        wait_for_regions_s=cfg.federation.wait_for_regions_s,
        excluded_nodes=pre.excluded,
        on_round=on_round,
        node_regions=pre.node_regions,
        registry=registry,
    )
    init = build_model(cfg.model, n_features=len(pre.feature_names), seed=cfg.seed * 1000 + shard)
    start = load_weights(run.checkpoint_path(round_=offset, shard=shard)) if offset else get_weights(init)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(start),
        num_rounds=cfg.training.rounds - offset,
        timeout=cfg.federation.round_timeout_s,
        train_config=extend(pre.plan, {wire.SHARD: shard, wire.ROUND_OFFSET: offset}),
        evaluate_config=pre.plan,
        evaluate_fn=checkpoint,  # type: ignore[arg-type]
    )
    return from_record(result.arrays)


def evaluate_served(
    grid: Grid,
    cfg: ExperimentConfig,
    pre: Preflight,
    *,
    constituents: dict[int, dict[str, np.ndarray]],
    registry: NodeRegistry | None,
) -> ServedEvaluation:
    """Every region taking part scores the served model on its hold-out and answers with DP noise."""
    final = _query(
        grid,
        pre.taking_part,
        extend(pre.plan, {wire.ACTION: wire.ACTION_EVALUATE_SERVED}),
        arrays=pack_constituents([constituents[k] for k in sorted(constituents)]),
        timeout=cfg.federation.round_timeout_s,
    )
    final, misclaimed = screen_claims(final, registry)
    pre.events["rejected"].update(misclaimed)
    for msg in final:  # a refused evaluation is a refusal of the run: the summary's table names it
        region, outcome, reason = _status(msg)
        if outcome == wire.OUTCOME_REFUSED:
            pre.events["refused"].setdefault(region, f"final evaluation: {reason or outcome}")  # the first why
    per_region, pooled, skipped = pooled_evaluation(final)
    return ServedEvaluation(
        per_region=per_region, pooled=pooled, suppressed=skipped, trust=pooled_trust(final, schema=pre.schema)
    )


def summarise(
    cfg: ExperimentConfig, pre: Preflight, ev: ServedEvaluation, *, model_version: int, report: Report
) -> RunSummary:
    """The run's summary: public figures only (declared sizes, noisy metrics, ε per region)."""
    privacy = {}
    for region in cfg.regions:
        d = pre.described.get(region, {})
        answer = ev.per_region.get(region, {})
        pre.saw_spent(region, d.get("epsilon"))
        pre.saw_spent(region, answer.get("epsilon"))
        privacy[region] = {
            "epsilon": pre.spent.get(region),  # what its ledger holds, if the final evaluation was refused too
            "delta": answer.get("delta", d.get("delta")),  # the region's, from its policy
            "budget": d.get("budget"),
            "accountant": cfg.privacy.accountant,
            "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.mode == "sample_dp" else None,
            "refused": pre.refused.get(region) or pre.events["refused"].get(region),
            # Every release of this run that the ledger holds, a round retried after a crash included.
            "releases_this_run": answer.get("releases_this_run"),
        }
        if cfg.privacy.mode == "client_dp":
            # The ledger's ε holds against the model's users only: the server saw each clipped update.
            privacy[region]["against_server"] = AGAINST_SERVER
    wall_time_s = round(time.time() - pre.started, 2)
    notes = list(pre.notes)
    noise_sd = ev.pooled.get("auc_noise_sd", 0.0)
    if noise_sd > AUC_NOISE_WARNING:
        note = (
            f"the pooled AUC is a DP answer and its noise alone moves it by ±{noise_sd:.2f} (one standard "
            "deviation): the regions' hold-outs are too small for a precise evaluation at their policies' "
            "evaluation_noise; read it as a rough figure, or evaluate on more customers"
        )
        notes.append(note)
        report(f"[warning] {note}")
    return RunSummary(
        name=cfg.name,
        run_id=pre.run_id,
        task=cfg.task,
        privacy_mode=cfg.privacy.mode,
        final_metrics={
            k: ev.pooled[k]
            for k in ("auc", "auc_noise_sd", "log_loss", "accuracy", "brier", "customers")
            if k in ev.pooled
        },
        final_metrics_by_region={r: m for r, m in ev.per_region.items() if "auc" in m},
        suppressed_regions=ev.suppressed,
        privacy=privacy,
        # As the regions' policies declare them (rounded by default): exact counts never leave a region.
        regions={r: {"train": d[wire.DECLARED_TRAIN]} for r, d in pre.described.items() if wire.DECLARED_TRAIN in d},
        events=pre.events,
        warnings=notes,
        shards=cfg.unlearning.shards,
        model_version=model_version,
        rounds_completed=cfg.training.rounds,
        config_sha256=cfg.digest(),
        code_version=code_version(),
        started=pre.started,
        wall_time_s=wall_time_s,
        # The server's audit log as this run found it (its run_started entry included): a later
        # `fedcrm audit verify RUN_DIR/audit.log --expect-head` shows the log was not cut back or rewritten.
        audit_head=server_audit_log(pre.run.path).head(),
        fairness=ev.trust.get("fairness"),
        feature_importance=ev.trust.get("feature_importance"),
    )


@audited_run  # run_started / run_finished / run_failed in RUN_DIR/audit.log
def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    *,
    run_dir: Path,
    report: Report = print,
    shards: list[int] | None = None,
    initial: dict[int, dict[str, np.ndarray]] | None = None,
    model_version: int = 1,
    resume: bool = False,
    registry: NodeRegistry | None = None,
) -> RunSummary:
    """Train (the given constituents of) the served model federatedly; return the run summary.

    With ``resume``, rounds already completed in ``run_dir`` (metrics.jsonl + checkpoints) are not
    trained again: each constituent continues from its last checkpoint, with the same run id. ``registry``
    says which node was registered for which region: a reply claiming another region is rejected (without
    it, the regions' own claims are taken, with a warning).
    """
    done_rounds = completed_rounds(run_dir) if resume else {}
    pre = preflight(grid, cfg, run_dir=run_dir, report=report, resume=resume, registry=registry)
    constituents: dict[int, dict[str, np.ndarray]] = dict(initial or {})
    for k in range(cfg.unlearning.shards) if shards is None else shards:
        offset = done_rounds.get(k, 0)
        if offset >= cfg.training.rounds:
            constituents[k] = load_weights(pre.run.checkpoint_path(round_=offset, shard=k))
            report(f"shard {k}: all {offset} rounds already completed, not trained again")
            continue
        if offset:
            report(f"resuming shard {k} after round {offset} from its checkpoint")
        constituents[k] = train_constituent(grid, cfg, pre, shard=k, offset=offset, report=report, registry=registry)
    pre.run.save_model(constituents=constituents, feature_names=pre.feature_names, version=model_version)
    evaluation = evaluate_served(grid, cfg, pre, constituents=constituents, registry=registry)
    summary = summarise(cfg, pre, evaluation, model_version=model_version, report=report)
    pre.run.write_summary(summary)
    return summary
