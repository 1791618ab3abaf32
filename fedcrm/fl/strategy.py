"""Flower strategies for fedcrm, and a guard that wraps any of them.

The guard drops refusals and failures, rejects replies whose claimed region is not the one their node
was registered for (:mod:`fedcrm.fl.registry`), malformed updates (keys, shapes, dtype, non-finite
values), replayed updates (bit-for-bit equal to one already received) and updates that move the model
too far (an absolute bound, or many times the round's median), each with a logged reason; it enforces
the minimum number of regions per round, and turns the regions' hold-out histograms into pooled
metrics. Aggregation itself stays Flower's.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedcrm import wire
from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import Schema
from fedcrm.errors import federation_stopped
from fedcrm.evaluation.metrics import ScoreSummary, auc_from_histograms
from fedcrm.fl.codec import number
from fedcrm.fl.registry import NodeRegistry

log = logging.getLogger("fedcrm.server")


@dataclass
class RoundEvents:
    """What happened to each region in a round, for metrics.jsonl and the summary."""

    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)  # regions the server asked to train (its sample)


def build_strategy(cfg: ExperimentConfig, *, regions: int) -> Strategy:
    fed = cfg.federation
    common: dict[str, Any] = dict(
        # Flower's own sampler: each round trains int(eligible × fraction_train) regions, at least
        # min_regions, drawn by the server (see FederationConfig.fraction_train: no privacy amplification).
        fraction_train=fed.fraction_train,
        # Every evaluation answer is a DP release charged to the regions' hold-outs: per round only on request.
        fraction_evaluate=1.0 if cfg.evaluation.every_round else 0.0,
        min_train_nodes=min(fed.min_regions, regions),
        min_evaluate_nodes=min(fed.min_regions, regions),
        # Not `regions`: Flower's sampler waits until that many nodes are online, so one region whose node
        # dies would stall the whole run; run_federation has already waited for every region to connect.
        min_available_nodes=min(fed.min_regions, regions),
    )
    inner: Strategy
    if fed.strategy == "fedprox":
        inner = FedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "fedmedian":
        inner = FedMedian(**common)
    elif fed.strategy == "fedtrimmedavg":
        inner = FedTrimmedAvg(beta=fed.trimmed_fraction, **common)
    elif fed.strategy == "krum":
        inner = Krum(num_malicious_nodes=fed.hostile_regions, **common)
    else:
        inner = FedAvg(**common)
    if cfg.privacy.mode == "client_dp":
        inner = NoiseForAggregated(
            inner,
            noise_multiplier=cfg.privacy.client_noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=regions,
        )
    return inner


class NoiseForAggregated(DifferentialPrivacyClientSideFixedClipping):
    """Client-level DP (DP-FedAvg): regions clip their own update, the server noises the uniform average.

    Flower's wrapper scales the noise to the number of clients *configured* (σ·C/m); fedcrm scales it
    to the updates actually aggregated this round, so a round with fewer regions (refusals, failures,
    rejected updates) still gives each region's update the noise its ledger charged for. That noise, σ·C/m,
    is σ/2 times one *customer's* sensitivity 2C/m (their removal moves their region's clipped update
    across the C-ball), so the regions' ledgers charge σ/2 (:mod:`fedcrm.privacy.client_dp`). The server
    itself sees every clipped update before this noise: against it client-level DP is ε = ∞.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        replies = list(replies)
        self.num_sampled_clients = max(1, sum(1 for r in replies if not r.has_error()))
        return super().aggregate_train(server_round, replies)


def check_update(update: ArrayRecord, *, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why an update must be rejected, or None when it is well formed."""
    found = {k: tuple(v.shape) for k, v in update.items()}
    if set(found) != set(expected):
        return f"parameters {sorted(set(found) ^ set(expected))} missing or unexpected"
    for k, v in update.items():
        arr = v.numpy()
        if tuple(arr.shape) != expected[k]:
            return f"parameter {k} has shape {arr.shape}, expected {expected[k]}"
        if arr.dtype != np.float32:
            return f"parameter {k} has dtype {arr.dtype}, expected float32"
        if not np.all(np.isfinite(arr)):
            return f"parameter {k} has NaN or infinite values"
    return None


def update_digest(update: ArrayRecord) -> str:
    """A fingerprint of an update's values: equal digests mean a replayed (or copied) update."""
    h = hashlib.sha256()
    for k in sorted(update.keys()):
        arr = np.ascontiguousarray(update[k].numpy())
        h.update(k.encode() + b"\0" + str(arr.shape).encode() + b"\0" + arr.tobytes())
    return h.hexdigest()


def update_norm(update: ArrayRecord, sent: dict[str, np.ndarray]) -> float:
    """L2 norm of the change an update makes to the model the server sent."""
    return float(np.sqrt(sum(float(np.sum((update[k].numpy().astype(np.float64) - sent[k]) ** 2)) for k in sent)))


def _status(msg: Message) -> tuple[str, str, str]:
    if msg.has_error():
        return f"node-{msg.metadata.src_node_id}", wire.OUTCOME_FAILED, str(msg.error.reason)[:300]
    st = msg.content.get(wire.STATUS)
    if st is None:
        return f"node-{msg.metadata.src_node_id}", wire.OUTCOME_FAILED, "reply without a status record"
    return str(st[wire.REGION]), str(st[wire.OUTCOME]), str(st.get(wire.REASON, ""))


def screen_claims(replies: Iterable[Message], registry: NodeRegistry | None) -> tuple[list[Message], dict[str, str]]:
    """The replies whose claimed region is the one their node was registered for, and the others' reasons.

    A rejected reply is named by the region its node *was registered for* (or ``node-<id>`` when it was
    never registered), never by the region it claims: a claim is what is being doubted. Without a
    registry every claim is taken as given (``run_federation`` then warns). Error replies claim nothing
    and pass through.
    """
    if registry is None:
        return list(replies), {}
    kept: list[Message] = []
    rejected: dict[str, str] = {}
    for msg in replies:
        if msg.has_error():
            kept.append(msg)
            continue
        node = msg.metadata.src_node_id
        registered = registry.region_of(node)
        st = msg.content.get(wire.STATUS)
        claimed = None if st is None else str(st.get(wire.REGION, ""))
        if registered is None:
            rejected[f"node-{node}"] = (
                f"node {node} is not in the node registry: its reply claims region "
                f"`{claimed}`, which nothing vouches for"
            )
        elif claimed is not None and claimed != registered:
            rejected[registered] = (
                f"reply claims region `{claimed}`, but node {node} is registered for "
                f"`{registered}`: rejected, nothing of it counted"
            )
        else:
            kept.append(msg)
    return kept, rejected


def pooled_evaluation(
    replies: Iterable[Message],
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, str]]:
    """Per-region metrics, pooled metrics (from summed histograms) and regions that sent none."""
    per_region: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    total: ScoreSummary | None = None
    noise_var = 0.0  # variance of the noise on each pooled count: the regions' answers add up
    for msg in replies:
        region, outcome, reason = _status(msg)
        m = msg.content.get(wire.METRICS) if not msg.has_error() else None
        if outcome != wire.OUTCOME_OK or m is None:
            skipped[region] = reason or outcome
            continue
        eps = {"epsilon": number(m, wire.EPSILON)} if wire.EPSILON in m else {}
        if wire.RUN_RELEASES in m:
            eps["releases_this_run"] = number(m, wire.RUN_RELEASES)
        if wire.HIST_POS not in m:
            per_region[region] = eps
            skipped[region] = reason or "no hold-out metrics"
            continue
        # A DP answer: noisy counts, kept as they are. Zero-mean noise leaves sums and the AUC's bilinear
        # numerator unbiased; clipping negative bins at zero would add mass to every empty bin.
        s = ScoreSummary(
            hist_pos=np.asarray(m[wire.HIST_POS], dtype=np.float64),
            hist_neg=np.asarray(m[wire.HIST_NEG], dtype=np.float64),
            sum_log_loss=number(m, wire.SUM_LOG_LOSS),
            sum_brier=number(m, wire.SUM_BRIER),
            correct=number(m, wire.CORRECT),
        )
        if total is not None and s.hist_pos.shape != total.hist_pos.shape:
            skipped[region] = "hold-out histograms of another size than the other regions'"
            continue
        per_region[region] = s.metrics() | eps
        total = s if total is None else total + s
        noise_var += number(m, wire.ANSWER_NOISE_STD, 0.0) ** 2
    pooled = total.metrics() if total is not None else {}
    if total is not None and noise_var > 0 and "auc" in pooled:
        pooled["auc_noise_sd"] = auc_noise_sd(total, noise_std=noise_var**0.5)
    return per_region, pooled, skipped


def auc_noise_sd(summary: ScoreSummary, *, noise_std: float, draws: int = 200) -> float:
    """How much the DP noise alone moves an AUC read off these histograms (a parametric bootstrap).

    Post-processing of public quantities (the noisy answer and the noise's std), so it costs nothing;
    it tells the engineer whether a hold-out is too small for the DP evaluation to say much.
    """
    rng = np.random.default_rng(0)  # a statistic of public numbers: reproducible on purpose
    aucs = [
        auc_from_histograms(
            summary.hist_pos + rng.normal(0, noise_std, summary.hist_pos.shape),
            summary.hist_neg + rng.normal(0, noise_std, summary.hist_neg.shape),
        )
        for _ in range(draws)
    ]
    return float(np.nanstd(np.clip(aucs, 0.0, 1.0)))


def pooled_trust(replies: Iterable[Message], *, schema: Schema) -> dict[str, Any]:
    """Fairness per group and feature importance of the served model, summed over the regions' replies.

    A reply whose trust metrics do not fit the schema is left out with a warning, not fatal: the
    accuracy metrics of the run stand without it.
    """
    from fedcrm.evaluation.trust import PooledTrust

    pooled = PooledTrust(groups={})
    for msg in replies:
        region, outcome, _ = _status(msg)
        m = msg.content.get(wire.METRICS) if not msg.has_error() else None
        if outcome != wire.OUTCOME_OK or m is None:
            continue
        try:
            pooled.add_metrics(dict(m.items()), schema=schema)
        except ValueError as e:
            log.warning("region %s: trust metrics left out: %s", region, e)
    return pooled.report(schema=schema)


class EligibleNodes:
    """The grid as the inner strategy's sampler sees it: only the nodes that may train in this run.

    Flower's FedAvg samples ``int(connected × fraction_train)`` of the *connected* nodes. A node that refused
    the plan at pre-flight (or misclaimed its region) is still connected: drawn and then dropped, it would
    leave the round with fewer regions than the fraction asks, or fewer than ``min_regions``.
    Everything else is the real grid's.
    """

    def __init__(self, grid: Grid, *, excluded: set[int]) -> None:
        self._grid = grid
        self._excluded = excluded

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class GuardedStrategy(Strategy):
    """Wraps a Flower strategy: screens replies before the inner strategy aggregates them."""

    def __init__(
        self,
        inner: Strategy,
        *,
        min_regions: int,
        excluded_nodes: set[int],
        on_round: Callable[[int, RoundEvents, dict[str, dict[str, float]], dict[str, float]], None],
        node_regions: dict[int, str] | None = None,
        registry: NodeRegistry | None = None,
        max_update_norm: float | None = None,
        outlier_norm_ratio: float | None = None,
        wait_for_regions_s: float = 0.0,
    ) -> None:
        self.inner = inner
        self.wait_for_regions_s = wait_for_regions_s
        self.max_update_norm = max_update_norm
        self.outlier_norm_ratio = outlier_norm_ratio
        # digest -> (region, round) of every update accepted so far: a replay is refused, naming the original.
        self.seen: dict[str, tuple[str, int]] = {}
        self.global_weights: dict[str, np.ndarray] = {}
        # node id -> region name (from the pre-flight), to name a region that was asked but never answered.
        self.node_regions = dict(node_regions or {})
        # node id -> region as registered: a reply claiming another region is rejected (screen_claims).
        self.registry = registry
        self.sent: dict[tuple[str, int], list[Message]] = {}
        self.min_regions = min_regions
        self.excluded_nodes = excluded_nodes
        self.on_round = on_round
        self.expected: dict[str, tuple[int, ...]] = {}
        self.events: dict[int, RoundEvents] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.expected = {k: tuple(v.shape) for k, v in arrays.items()}
        self.global_weights = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        self._await_regions(server_round, grid)
        eligible = cast(Grid, EligibleNodes(grid, excluded=self.excluded_nodes))
        msgs = self.inner.configure_train(server_round, arrays, config, eligible)
        out = [m for m in msgs if m.metadata.dst_node_id not in self.excluded_nodes]
        self.sent[("train", server_round)] = out
        ev = self.events.setdefault(server_round, RoundEvents())
        ev.selected = sorted(self._region_of(m.metadata.dst_node_id) for m in out)
        return out

    def _await_regions(self, server_round: int, grid: Grid, *, poll_s: float = 0.5) -> None:
        """Wait, up to ``wait_for_regions_s``, until every region that passed pre-flight is connected; name
        those still missing in the round's ``failed`` events.

        Flower samples a round's regions among the nodes connected when it starts, and a round can start
        the moment the previous one ends. A SuperNode restarted after a crash can only rejoin once the
        SuperLink has marked it offline (up to a minute of missed heartbeats), which is also when the
        round it was in ends: without a wait it misses the next round by a race, and without a record
        nothing says it was left out.
        """
        # The nodes that passed pre-flight; a pre-flight error reply came from the SuperLink, not a region.
        expected = set(self.node_regions) - self.excluded_nodes - {SUPERLINK_NODE_ID}
        if not expected:
            return
        deadline = time.monotonic() + self.wait_for_regions_s
        missing = expected - set(grid.get_node_ids())
        if missing and self.wait_for_regions_s > 0:
            log.info(
                "round %d: waiting up to %g s for %s to connect",
                server_round,
                self.wait_for_regions_s,
                ", ".join(sorted(self._region_of(n) for n in missing)),
            )
        while missing and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            missing = expected - set(grid.get_node_ids())
        ev = self.events.setdefault(server_round, RoundEvents())
        for node in sorted(missing):
            region = self._region_of(node)
            ev.failed.setdefault(
                region,
                f"not connected when the round started (waited "
                f"{self.wait_for_regions_s:g} s, federation.wait_for_regions_s)",
            )
            log.warning("round %d: region %s is not connected: %s", server_round, region, ev.failed[region])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ev = self.events.setdefault(server_round, RoundEvents())
        replies = self._record_silent(ev, "training", self.sent.get(("train", server_round), []), list(replies))
        replies = self._screen_claims(ev, replies)
        accepted = []
        for msg in replies:
            region, outcome, reason = _status(msg)
            if outcome == wire.OUTCOME_REFUSED:
                ev.refused[region] = reason
            elif outcome != wire.OUTCOME_OK:
                ev.failed[region] = reason
            elif wire.ARRAYS not in msg.content or wire.METRICS not in msg.content:
                ev.rejected[region] = "reply without weights or metrics"
            elif (why := self._malformed_or_replayed(msg.content[wire.ARRAYS])) is not None:  # type: ignore[arg-type]
                ev.rejected[region] = why
            else:
                accepted.append(msg)
        accepted = self._screen_norms(ev, accepted)
        for msg in accepted:
            region = _status(msg)[0]
            self.seen[update_digest(msg.content[wire.ARRAYS])] = (region, server_round)  # type: ignore[arg-type]
            ev.train[region] = {k: float(v) for k, v in msg.content[wire.METRICS].items()}  # type: ignore[arg-type]
        for kind, items in (("refused", ev.refused), ("failed", ev.failed), ("rejected", ev.rejected)):
            for region, reason in items.items():
                log.warning("round %d: region %s %s: %s", server_round, region, kind, reason)
        if len(accepted) < self.min_regions:
            raise federation_stopped(
                f"round {server_round}: only {len(accepted)} region(s) sent a usable update, fewer than "
                f"federation.min_regions = {self.min_regions}. Refused: {ev.refused or 'none'}; failed: "
                f"{ev.failed or 'none'}; rejected: {ev.rejected or 'none'}",
                refused=ev.refused,
                others=bool(ev.failed or ev.rejected),
            )
        return self.inner.aggregate_train(server_round, accepted)

    def _screen_claims(self, ev: RoundEvents, replies: list[Message]) -> list[Message]:
        kept, rejected = screen_claims(replies, self.registry)
        ev.rejected.update(rejected)
        return kept

    def _region_of(self, node: int) -> str:
        registered = self.registry.region_of(node) if self.registry is not None else None
        return registered or self.node_regions.get(node, f"node-{node}")

    def _malformed_or_replayed(self, update: ArrayRecord) -> str | None:
        if (why := check_update(update, expected=self.expected)) is not None:
            return why
        earlier = self.seen.get(update_digest(update))
        if earlier is None:
            return None
        region, rnd = earlier
        return (
            f"replayed update: bit-for-bit equal to the update region {region} sent in round {rnd}; "
            "a fresh round of training never repeats an update"
        )

    def _screen_norms(self, ev: RoundEvents, accepted: list[Message]) -> list[Message]:
        """Reject updates that move the model farther than the absolute bound or the outlier ratio allow."""
        if not accepted or (self.max_update_norm is None and self.outlier_norm_ratio is None):
            return accepted
        norms = {id(m): update_norm(m.content[wire.ARRAYS], self.global_weights) for m in accepted}  # type: ignore[arg-type]
        median = statistics.median(norms.values())
        kept = []
        for msg in accepted:
            norm, region = norms[id(msg)], _status(msg)[0]
            if self.max_update_norm is not None and norm > self.max_update_norm:
                ev.rejected[region] = (
                    f"update norm {norm:.4g} exceeds federation.max_update_norm = {self.max_update_norm:g}"
                )
            elif (
                self.outlier_norm_ratio is not None
                and len(accepted) >= 3
                and median > 0
                and norm > self.outlier_norm_ratio * median
            ):
                ev.rejected[region] = (
                    f"update norm {norm:.4g} is {norm / median:.1f}x the round's median "
                    f"{median:.4g}, over federation.outlier_norm_ratio = "
                    f"{self.outlier_norm_ratio:g}"
                )
            else:
                kept.append(msg)
        return kept

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        msgs = self.inner.configure_evaluate(server_round, arrays, config, grid)
        out = [m for m in msgs if m.metadata.dst_node_id not in self.excluded_nodes]
        self.sent[("evaluate", server_round)] = out
        return out

    def _record_silent(self, ev: RoundEvents, phase: str, sent: list[Message], replies: list[Message]) -> list[Message]:
        """Name the regions that did not answer; return the replies that came from the regions themselves.

        A node that was sent a message and did not answer within the round's timeout sends nothing at
        all (Flower passes only replies on), and one whose heartbeat stopped gets an error reply *from the
        SuperLink* (another source node id): both are named here by region, or the summary would not say
        which region was missing.
        """
        dst = {m.metadata.dst_node_id for m in sent}
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        kept, answered = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in dst and msg.has_error() and msg.metadata.reply_to_message_id in by_id:
                node = by_id[msg.metadata.reply_to_message_id]
                region = self._region_of(node)
                ev.failed.setdefault(region, f"{str(msg.error.reason)[:300]} ({phase})")
                answered.add(node)
                continue
            answered.add(node)
            kept.append(msg)
        for node in sorted(dst - answered):
            region = self._region_of(node)
            ev.failed.setdefault(region, f"no reply within the round timeout ({phase})")
            log.warning("region %s: no reply within the round timeout (%s)", region, phase)
        return kept

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ev = self.events.setdefault(server_round, RoundEvents())
        replies = self._record_silent(ev, "evaluation", self.sent.get(("evaluate", server_round), []), list(replies))
        before = set(ev.rejected)
        replies = self._screen_claims(ev, replies)
        for region in sorted(set(ev.rejected) - before):
            log.warning("round %d: region %s rejected: %s", server_round, region, ev.rejected[region])
        per_region, pooled, _ = pooled_evaluation(replies)
        self.on_round(server_round, ev, per_region, pooled)
        return MetricRecord(pooled) if pooled else None  # type: ignore[arg-type]
