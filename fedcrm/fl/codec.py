"""Packing library values into Flower records and back."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedcrm import wire
from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import Schema, schema_from_text
from fedcrm.yamlio import validate_mapping

Weights = dict[str, np.ndarray]


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord.from_array_dict({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
    return {k: v.numpy() for k, v in record.items()}


def pack_constituents(constituents: list[Weights]) -> ArrayRecord:
    return to_record({wire.constituent_key(k, n): v for k, w in enumerate(constituents) for n, v in w.items()})


def unpack_constituents(record: ArrayRecord) -> list[Weights]:
    """The served model's constituents; plain keys (no ``cK/`` prefix) are a single model."""
    weights = from_record(record)
    if not all("/" in k for k in weights):
        return [weights]
    out: dict[int, Weights] = {}
    for key, v in weights.items():
        head, name = key.split("/", 1)
        out.setdefault(int(head[1:]), {})[name] = v
    return [out[k] for k in sorted(out)]


def plan_config(cfg: ExperimentConfig, *, schema_text: str, run_id: str) -> ConfigRecord:
    """What the server tells every region about the run: no path, no customer, only the plan."""
    public = cfg.to_dict()
    public["regions"] = {name: "(set by the region's data owner)" for name in cfg.regions}
    public["split"] = None
    public["policies"] = {}
    public["region_schemas"] = {}  # each region's schema is its data owner's (its node config), not the server's
    public["region_delimiters"] = {}  # each region's file format is its own (its node config), not the server's
    public.pop("tracking", None)  # server side only: where results are tracked is none of a region's business
    public["schema"] = "(sent as text)"
    public["output_dir"] = "(server side)"
    return ConfigRecord(
        {
            wire.EXPERIMENT: json.dumps(public),
            wire.SCHEMA: schema_text,
            wire.RUN_ID: run_id,
        }
    )


def read_plan(config: ConfigRecord) -> tuple[ExperimentConfig, Schema, str]:
    """The run's config, schema and id as the server sent them. The schema is the server's request only: a
    region reads its table with its data owner's own (``Region.owned_schema``), never with this one."""
    cfg, schema = _parse_plan(str(config[wire.EXPERIMENT]), str(config[wire.SCHEMA]))
    return cfg, schema, str(config[wire.RUN_ID])


@lru_cache(maxsize=16)
def _parse_plan(experiment: str, schema_text: str) -> tuple[ExperimentConfig, Schema]:
    """The plan's config and schema, parsed once per process for every message that carries the same text.

    A run sends the same plan with every message; parsing its schema's YAML was over half of a small
    region's work per round (docs/benchmarks.md). Both results are frozen models, safe to share; a text
    that fails to parse raises each time (exceptions are not cached).
    """
    cfg = validate_mapping(ExperimentConfig, json.loads(experiment), source="plan sent by the server")
    return cfg, schema_from_text(schema_text, source="schema sent by the server")


def extend(config: ConfigRecord, extra: dict[str, str | int | float]) -> ConfigRecord:
    """A copy of ``config`` with ``extra`` keys added (each message gets its own record)."""
    return ConfigRecord({**dict(config.items()), **extra})  # type: ignore[dict-item]


def number(record: Any, key: str, default: float | None = None) -> float:
    """A numeric value of a record, checked: a peer that sends text where a number belongs is refused."""
    if key not in record:
        if default is None:
            raise ValueError(f"record lacks `{key}`")
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{key}` must be a number, got {type(value).__name__}")
    return float(value)
