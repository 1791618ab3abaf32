"""The server's side of a run: pre-flight, one federated training per SISA constituent, the served
model's evaluation, and the run directory. The Flower ServerApp in ``server/`` only calls this.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcrm import wire
from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import load_schema
from fedcrm.errors import FederationError
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
            "un-noised. ε here protects a region against other regions and the model's users, not against "
            "the server or its operator."
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
    return (f"{len(eps)} regions, {eps[lowest]:.2f} ({lowest}) to {eps[highest]:.2f} ({highest}), "
            f"median {statistics.median(eps.values()):.2f}")


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
) -> dict[str, Any]:
    """Train (the given constituents of) the served model federatedly; return the run summary.

    With ``resume``, rounds already completed in ``run_dir`` (metrics.jsonl + checkpoints) are not
    trained again: each constituent continues from its last checkpoint, with the same run id and the
    same per-round seeds, so the result equals an uninterrupted run. ``registry`` says which node was
    registered for which region: a reply claiming another region is rejected (without it, the regions'
    own claims are taken, with a warning).
    """
    t0 = time.time()
    schema_text = cfg.schema_path.read_text(encoding="utf-8")
    schema = load_schema(cfg.schema_path)
    feature_names = FeatureEncoder(schema).feature_names
    done_rounds = completed_rounds(run_dir) if resume else {}
    run = RunDir.create(run_dir, cfg)
    run_id = run.run_id(resume=resume, new=f"{cfg.name}-{uuid.uuid4().hex[:8]}")
    timeout = cfg.federation.round_timeout_s
    n_regions = len(cfg.regions)

    nodes = _wait_for_nodes(grid, expected=n_regions, timeout=min(timeout, 120))
    if len(nodes) < cfg.federation.min_regions:
        raise FederationError(
            f"only {len(nodes)} region node(s) connected, need federation.min_regions = {cfg.federation.min_regions}"
        )
    # Pre-flight: every region checks the plan against its policy and data, all at once.
    plan = plan_config(cfg, schema_text=schema_text, run_id=run_id)
    replies = _query(grid, nodes, extend(plan, {wire.ACTION: wire.ACTION_DESCRIBE}), timeout=timeout)
    answered = {m.metadata.src_node_id for m in replies}
    replies, misclaimed = screen_claims(replies, registry)
    described: dict[str, dict[str, float]] = {}
    refused: dict[str, str] = {}
    excluded: set[int] = set(nodes)
    node_regions: dict[int, str] = {}  # node id -> region, to name a region that later goes silent
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
        raise FederationError(
            f"pre-flight: {len(described)} region(s) can take part, fewer than federation.min_regions = "
            f"{cfg.federation.min_regions}: " + "; ".join(f"{r}: {why}" for r, why in refused.items())
        )
    notes = privacy_warnings(cfg, regions=len(described)) + (
        [] if registry is not None else ["no node registry: region names are the regions' own claims, unchecked"]
    )
    for note in notes:
        report(f"[warning] {note}")

    shards = list(range(cfg.unlearning.shards)) if shards is None else shards
    constituents: dict[int, dict[str, np.ndarray]] = dict(initial or {})
    rounds_log: list[dict[str, Any]] = []
    all_events: dict[str, dict[str, str]] = {"refused": dict(refused), "failed": {}, "rejected": dict(misclaimed)}
    for node in sorted(set(nodes) - answered):
        all_events["failed"][f"node-{node}"] = "no reply to the pre-flight within the round timeout"

    for k in shards:
        offset = done_rounds.get(k, 0)
        if offset >= cfg.training.rounds:
            constituents[k] = load_weights(run.checkpoint_path(round_=offset, shard=k))
            report(f"shard {k}: all {offset} rounds already completed, not trained again")
            continue
        if offset:
            report(f"resuming shard {k} after round {offset} from its checkpoint")

        def on_round(
            rnd: int,
            ev: RoundEvents,
            per_region: dict[str, dict[str, float]],
            pooled: dict[str, float],
            shard: int = k,
            offset: int = offset,
        ) -> None:
            rnd += offset
            eps = {r: m["epsilon"] for r, m in ev.train.items()}
            row = {
                "round": rnd,
                "shard": shard,
                "time_s": round(time.time() - t0, 3),
                "pooled": pooled,
                "regions": per_region,
                "epsilon": eps,
                "refused": ev.refused,
                "failed": ev.failed,
                "rejected": ev.rejected,
            }
            run.append_metrics(row)
            rounds_log.append(row)
            for kind in ("refused", "failed", "rejected"):
                all_events[kind].update(getattr(ev, kind))
            eps_text = _epsilon_text(eps)
            shard_text = f" shard {shard + 1}/{cfg.unlearning.shards}" if cfg.unlearning.shards > 1 else ""
            quality = (f"  pooled AUC {pooled['auc']:.4f}  log-loss {pooled.get('log_loss', float('nan')):.4f}"
                       if "auc" in pooled else "")
            report(
                f"round {rnd:>3}/{cfg.training.rounds}{shard_text}:{quality}  ε spent: {eps_text or '-'}"
                f"  ({time.time() - t0:.1f}s)"
            )

        strategy = GuardedStrategy(
            build_strategy(cfg, regions=len(described)),
            min_regions=cfg.federation.min_regions,
            max_update_norm=cfg.federation.max_update_norm,
            outlier_norm_ratio=cfg.federation.outlier_norm_ratio,
            wait_for_regions_s=cfg.federation.wait_for_regions_s,
            excluded_nodes=excluded,
            on_round=on_round,
            node_regions=node_regions,
            registry=registry,
        )
        init = build_model(cfg.model, n_features=len(feature_names), seed=cfg.seed * 1000 + k)

        def checkpoint(rnd: int, arrays: ArrayRecord, shard: int = k, offset: int = offset) -> None:
            if rnd > 0:
                run.save_checkpoint(round_=rnd + offset, shard=shard, weights=from_record(arrays))

        start = load_weights(run.checkpoint_path(round_=offset, shard=k)) if offset else get_weights(init)
        result = strategy.start(
            grid=grid,
            initial_arrays=to_record(start),
            num_rounds=cfg.training.rounds - offset,
            timeout=timeout,
            train_config=extend(plan, {wire.SHARD: k, wire.ROUND_OFFSET: offset}),
            evaluate_config=plan,
            evaluate_fn=checkpoint,  # type: ignore[arg-type]
        )
        constituents[k] = from_record(result.arrays)

    run.save_model(constituents=constituents, feature_names=feature_names, version=model_version)
    ordered = [constituents[k] for k in sorted(constituents)]
    final = _query(
        grid,
        sorted(set(nodes) - excluded),
        extend(plan, {wire.ACTION: wire.ACTION_EVALUATE_SERVED}),
        arrays=pack_constituents(ordered),
        timeout=timeout,
    )
    final, misclaimed = screen_claims(final, registry)
    all_events["rejected"].update(misclaimed)
    per_region, pooled, skipped = pooled_evaluation(final)
    privacy = {}
    for region in cfg.regions:
        d = described.get(region, {})
        privacy[region] = {
            "epsilon": per_region.get(region, {}).get("epsilon", d.get("epsilon")),
            "delta": per_region.get(region, {}).get("delta", d.get("delta")),  # the region's, from its policy
            "budget": d.get("budget"),
            "accountant": cfg.privacy.accountant,
            "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.mode == "sample_dp" else None,
            "refused": refused.get(region) or all_events["refused"].get(region),
            # Every release of this run that the ledger holds, a round retried after a crash included.
            "releases_this_run": per_region.get(region, {}).get("releases_this_run"),
        }
    summary = {
        "name": cfg.name,
        "run_id": run_id,
        "task": cfg.task,
        "privacy_mode": cfg.privacy.mode,
        "final_metrics": {k: pooled[k] for k in ("auc", "auc_noise_sd", "log_loss", "accuracy", "brier", "customers")
                          if k in pooled},
        "final_metrics_by_region": {r: m for r, m in per_region.items() if "auc" in m},
        "suppressed_regions": skipped,
        "privacy": privacy,
        # As the regions' policies declare them (rounded by default): exact counts never leave a region.
        "regions": {r: {"train": d["train"]} for r, d in described.items() if "train" in d},
        "events": all_events,
        "warnings": notes,
        "shards": cfg.unlearning.shards,
        "model_version": model_version,
        "rounds_completed": cfg.training.rounds,
        "config_sha256": cfg.digest(),
        "code_version": code_version(),
        "started": t0,  # when this run began (Unix seconds): metrics.jsonl's time_s counts from here
        "wall_time_s": round(time.time() - t0, 2),
        # The server's audit log as this run found it (its run_started entry included): a later
        # `fedcrm audit verify RUN_DIR/audit.log --expect-head` shows the log was not cut back or rewritten.
        "audit_head": server_audit_log(run_dir).head(),
    }
    summary |= pooled_trust(final, schema=schema)  # fairness per group, feature importance
    noise_sd = pooled.get("auc_noise_sd", 0.0)
    if noise_sd > AUC_NOISE_WARNING:
        note = (f"the pooled AUC is a DP answer and its noise alone moves it by ±{noise_sd:.2f} (one standard "
                "deviation): the regions' hold-outs are too small for a precise evaluation at their policies' "
                "evaluation_noise; read it as a rough figure, or evaluate on more customers")
        notes.append(note)  # the list summary["warnings"] holds
        report(f"[warning] {note}")
    run.write_summary(summary)
    return summary
