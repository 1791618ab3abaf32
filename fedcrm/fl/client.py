"""The region's Flower ClientApp: unpack the message, call :class:`fedcrm.region.Region`, pack the reply.

Every reply passes one outgoing check against the wire vocabulary before it leaves; errors that
could carry customer values (a data error names a cell) are reported to the server in general terms
and in full only in the region's own log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcrm import wire
from fedcrm.errors import FedcrmError, PolicyError, RefusalError
from fedcrm.fl.codec import from_record, number, plan_config, read_plan, to_record, unpack_constituents
from fedcrm.region import NodeSettings, Region, RegionProfile, TrainRelease
from fedcrm.region_answers import EVALUATION_COORDINATES

log = logging.getLogger("fedcrm.region")
Handler = Callable[[Region, Message], RecordDict]


class BlockedReply(FedcrmError):
    """A reply held back by the outgoing check: it carried something outside the wire vocabulary."""


def check_outgoing(content: RecordDict) -> RecordDict:
    """Let through only declared records and keys; arrays only in the ``arrays`` record."""
    for name, record in content.items():
        if name not in wire.REPLY_RECORDS:
            raise BlockedReply(f"record `{name}` is not in the wire vocabulary")
        allowed: frozenset[str] | None = {
            wire.METRICS: wire.METRIC_KEYS,
            wire.STATUS: wire.STATUS_KEYS,
        }.get(name)
        if allowed is not None:
            extra = set(record.keys()) - allowed
            if extra:
                raise BlockedReply(f"keys {sorted(extra)} of record `{name}` are not in the wire vocabulary")
        if (name == wire.ARRAYS) != (type(record).__name__ == "ArrayRecord"):
            raise BlockedReply(f"record `{name}` has the wrong type {type(record).__name__}")
    return content


def _refuse_message(what: str) -> NoReturn:
    raise PolicyError(f"the server's message {what}", code=wire.REFUSED_MESSAGE)


def check_incoming(content: RecordDict) -> None:
    """Refuse a server message outside the wire vocabulary, from the message alone (no row read yet).

    Records: ``config`` (and ``arrays``); config keys: :data:`fedcrm.wire.PLAN_KEYS`, each of its shape.
    Whatever the server sends beyond them would be an input nothing bounds (README: "What the server sends").
    """
    extra = set(content.keys()) - wire.REQUEST_RECORDS
    if extra:
        _refuse_message(f"carries records {sorted(extra)}, outside {sorted(wire.REQUEST_RECORDS)}")
    config = content.get(wire.CONFIG)
    if not isinstance(config, ConfigRecord):
        _refuse_message(f"has no `{wire.CONFIG}` record of plan keys")
    if wire.ARRAYS in content and not isinstance(content[wire.ARRAYS], ArrayRecord):
        _refuse_message(f"carries `{wire.ARRAYS}` that are not an ArrayRecord")
    keys = set(config.keys())
    if keys - wire.PLAN_KEYS:
        _refuse_message(f"carries config keys {sorted(keys - wire.PLAN_KEYS)}, outside {sorted(wire.PLAN_KEYS)}")
    for key in (wire.EXPERIMENT, wire.SCHEMA, wire.RUN_ID):
        value = config.get(key)
        if not isinstance(value, str) or not value:
            _refuse_message(f"lacks `{key}` as text")
        if len(value) > wire.PLAN_TEXT_MAX_CHARS:
            _refuse_message(f"has a `{key}` of {len(value)} characters (at most {wire.PLAN_TEXT_MAX_CHARS})")
    run_id = str(config[wire.RUN_ID])
    if len(run_id) > wire.RUN_ID_MAX_CHARS or not run_id.isprintable():
        _refuse_message(f"has a run id that is not printable text of at most {wire.RUN_ID_MAX_CHARS} characters")
    if wire.ACTION in keys and config[wire.ACTION] not in wire.ACTIONS:
        _refuse_message(f"asks for action {config[wire.ACTION]!r}, not one of {sorted(wire.ACTIONS)}")
    for key in (wire.ROUND, wire.SHARD, wire.ROUND_OFFSET):
        if key in keys:
            value = config[key]
            whole = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, float) and value.is_integer()
            )
            if not whole or float(value) < 0:  # type: ignore[arg-type]
                _refuse_message(f"has `{key}` = {value!r}, not a whole number ≥ 0")


def status(region: str, outcome: str, reason: str = "", kind: str = "") -> ConfigRecord:
    return ConfigRecord({wire.REGION: region, wire.OUTCOME: outcome, wire.REASON: reason, wire.KIND: kind})


def release_metrics(release: TrainRelease) -> dict[str, float]:
    """A training reply's metrics: the release's public figures under their wire keys."""
    return {
        wire.NUM_EXAMPLES: release.weight,  # Flower's FedAvg weighs the updates by this key
        wire.NOISE_MULTIPLIER: release.noise_multiplier,
        wire.EPSILON: release.epsilon,
        wire.BUDGET: release.budget,
    }


def profile_metrics(profile: RegionProfile) -> dict[str, float]:
    """A pre-flight reply's metrics (ε apart): the region's public figures under their wire keys."""
    return {
        wire.DECLARED_TRAIN: profile.declared_customers,
        wire.SMALLEST_SHARD: profile.smallest_shard,
        wire.BUDGET: profile.budget,
        wire.DELTA: profile.delta,
        wire.MIN_CUSTOMERS: float(profile.min_customers),
        wire.N_FEATURES: float(profile.features),
    }


def _train(region: Region, msg: Message) -> RecordDict:
    config = msg.content[wire.CONFIG]
    cfg, schema, run_id = read_plan(config)  # type: ignore[arg-type]
    shard = int(number(config, wire.SHARD, 0))
    if shard >= cfg.unlearning.shards:
        _refuse_message(f"asks for shard {shard} of a run with {cfg.unlearning.shards} shards")
    release = region.train(
        cfg,
        schema,
        weights=from_record(msg.content[wire.ARRAYS]),  # type: ignore[arg-type]
        shard=shard,
        round_=int(number(config, wire.ROUND) + number(config, wire.ROUND_OFFSET, 0)),
        run_id=run_id,
    )
    return RecordDict(
        {
            wire.ARRAYS: to_record(release.weights),
            wire.METRICS: MetricRecord(release_metrics(release)),  # type: ignore[arg-type]
            wire.STATUS: status(region.name, wire.OUTCOME_OK),
        }
    )


def _evaluate(region: Region, msg: Message) -> RecordDict:
    cfg, schema, run_id = read_plan(msg.content[wire.CONFIG])  # type: ignore[arg-type]
    region.check_request(cfg, schema)
    summary = region.evaluate(
        cfg,
        schema,
        constituents=unpack_constituents(msg.content[wire.ARRAYS]),  # type: ignore[arg-type]
        run_id=run_id,
    )
    metrics: dict[str, Any] = {
        wire.EPSILON: region.epsilon(cfg),
        wire.DELTA: region.delta,
        wire.BUDGET: region.policy.privacy_budget,
        wire.RUN_RELEASES: sum(1 for e in region.ledger.events() if e.run_id == run_id),
        # A DP answer (fedcrm.privacy.aggregates): noisy counts and sums, charged to the region's ledger.
        wire.HIST_POS: summary.hist_pos.tolist(),
        wire.HIST_NEG: summary.hist_neg.tolist(),
        wire.SUM_LOG_LOSS: summary.sum_log_loss,
        wire.SUM_BRIER: summary.sum_brier,
        wire.CORRECT: summary.correct,
        wire.NUM_EXAMPLES: max(summary.n, 1.0),  # Flower's evaluate aggregation weighs by it
        wire.ANSWER_NOISE_STD: region.answer_noise_std(coordinates=EVALUATION_COORDINATES),
    }
    return RecordDict({wire.METRICS: MetricRecord(metrics), wire.STATUS: status(region.name, wire.OUTCOME_OK)})


def _with_trust(region: Region, msg: Message, content: RecordDict) -> RecordDict:
    """The served model's evaluation plus fairness per group and feature importance (one more DP answer)."""
    cfg, schema, run_id = read_plan(msg.content[wire.CONFIG])  # type: ignore[arg-type]
    trust = region.trust_summary(
        cfg,
        schema,
        constituents=unpack_constituents(msg.content[wire.ARRAYS]),  # type: ignore[arg-type]
        run_id=run_id,
    )
    metrics = content[wire.METRICS]
    for key, value in trust.to_metrics(schema=schema).items():
        metrics[key] = value  # type: ignore[index]
    # The spend after this second answer, so the run's summary includes it.
    metrics[wire.EPSILON] = region.epsilon(cfg)  # type: ignore[index,assignment]
    metrics[wire.RUN_RELEASES] = sum(1 for e in region.ledger.events() if e.run_id == run_id)  # type: ignore[index,assignment]
    return content


def _query(region: Region, msg: Message) -> RecordDict:
    config = msg.content[wire.CONFIG]
    if config.get(wire.ACTION) == wire.ACTION_EVALUATE_SERVED:
        return _with_trust(region, msg, _evaluate(region, msg))
    cfg, schema, _ = read_plan(config)  # type: ignore[arg-type]
    region.check_request(cfg, schema)
    described = profile_metrics(region.describe(cfg, schema)) | {wire.EPSILON: region.epsilon(cfg)}
    return RecordDict({wire.METRICS: MetricRecord(described), wire.STATUS: status(region.name, wire.OUTCOME_OK)})  # type: ignore[arg-type]


def answer(handler: Handler, msg: Message, context: Context) -> RecordDict:
    """The reply's content: the handler's result, a refusal, or a failure in general terms."""
    settings = NodeSettings.from_node_config(dict(context.node_config))
    try:
        region = Region(settings)  # its data cache is the process's: see _serve
    except FedcrmError as e:
        log.error("region %s cannot start: %s", settings.region, e)
        return RecordDict(
            {
                wire.STATUS: status(
                    settings.region,
                    wire.OUTCOME_FAILED,
                    f"{type(e).__name__}: the region's state or policy could not be read",
                    type(e).__name__,
                )
            }
        )
    try:
        with region.ledger.session():  # one ledger connection for the message's reads and writes
            check_incoming(msg.content)
            content = handler(region, msg)
    except RefusalError as e:
        # The server is told a fixed code; the words (exact counts below the policy's minimum, the
        # ε spent) stay here: in this log and, through Region, in the region's audit log.
        log.warning("region %s refuses (%s): %s", region.name, e.code, e)
        content = RecordDict({wire.STATUS: status(region.name, wire.OUTCOME_REFUSED, e.code, type(e).__name__)})
    except Exception as e:  # noqa: BLE001 - a region reports, in general terms, every failure
        # The full message may quote a cell of the table: it stays in the region's log.
        log.error("region %s: %s: %s", region.name, type(e).__name__, e)
        content = RecordDict(
            {
                wire.STATUS: status(
                    region.name,
                    wire.OUTCOME_FAILED,
                    wire.FAILED_IN_REGION,
                    "",
                )
            }
        )
    try:
        return check_outgoing(content)
    except BlockedReply as e:
        log.error("region %s: reply blocked by the outgoing check: %s", region.name, e)
        return RecordDict(
            {
                wire.STATUS: status(
                    region.name, wire.OUTCOME_FAILED, "reply blocked by the region's outgoing check", "BlockedReply"
                )
            }
        )


def _serve(handler: Handler, msg: Message, context: Context) -> Message:
    # Regions keep their encoded data in the process-wide cache (fedcrm.region.PROCESS_CACHE), not in one
    # held by the ClientApp: the simulation pickles the app, closures and all, to its actors with every
    # message, so a cache the app held would start empty each time (measured: every message re-read and
    # re-encoded its table, ~2 s per message on a 100k-customer region).
    return Message(content=answer(handler, msg, context), reply_to=msg)


def build_client_app(*, mods: Sequence[Callable[..., Message]] = ()) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _serve(_train, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _serve(_evaluate, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _serve(_query, msg, context)

    return app


__all__ = ["build_client_app", "check_outgoing", "plan_config", "profile_metrics", "release_metrics"]
