"""The run's schema against the region's own: the data owner decides who a customer is.

The server sends the schema of its run with every message, because its model is built from the encoding
the schema declares. But the schema also names the customer id (and how it is derived), the label, the
consent columns and the sensitive ones, and every keyed hash at the region (shards, hold-out, tombstones,
consent withdrawals) is a hash of that id. A server free to send ``id: {derive: row_number, prefix: p1-}``
would re-key the region's customers: a forgotten customer would be trained on again, and a new prefix
would re-draw the hold-out. ``consent: []`` would include customers who never agreed.

So a region reads its table only with its *own* schema, named by its data owner in the node settings
(``schema-path``). The run may choose which of the owner's feature columns its model uses, and nothing
else: a field that decides identity or encoding must equal the owner's, and a feature the owner did not
declare is refused (default-deny). The check runs before any customer row is read.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from fedcrm import wire
from fedcrm.data.cache import file_version
from fedcrm.data.schema import Schema, load_schema
from fedcrm.errors import PolicyError

# The fields of a schema that the data owner alone decides: who a customer is (id), what the model learns
# (label), who may be used for a purpose (purposes, consent), who is protected (sensitive), what is never
# read (excluded) and how a row is parsed (delimiter, decimal). A run's schema must carry each of them unchanged.
OWNER_FIELDS: Final = ("id", "label", "purposes", "consent", "sensitive", "excluded", "delimiter", "decimal")


def owner_schema(path: Path | None) -> Schema | None:
    """The data owner's schema file, parsed once per version of the file (a region reads it with every
    message, and parsing YAML was over half of a small region's work per round: docs/benchmarks.md)."""
    if path is None:
        return None
    return _parse(str(Path(path).resolve()), file_version(Path(path)))


@lru_cache(maxsize=16)
def _parse(path: str, version: tuple[int, int, int] | None) -> Schema:
    del version  # part of the cache key only: a rewritten file is parsed again
    return load_schema(path)


def _facts(value: Any) -> Any:
    """What a declaration decides, without its prose: descriptions are for readers and may differ."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _facts(v) for k, v in value.items() if k != "description"}
    if isinstance(value, (list, tuple)):
        return [_facts(v) for v in value]
    return value


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def schema_differences(plan: Schema, *, owner: Schema) -> list[str]:
    """Each way ``plan`` departs from what ``owner`` allows, in words; empty when the run may use it."""
    out = []
    for field in OWNER_FIELDS:
        mine, theirs = _facts(getattr(owner, field)), _facts(getattr(plan, field))
        if mine != theirs:
            out.append(f"`{field}`: the region declares {_show(mine)}, the run sends {_show(theirs)}")
    declared = {c.name: c for c in owner.features}
    for column in plan.features:
        if column.name not in declared:
            out.append(f"feature `{column.name}` is not among the region's declared features")
        elif _facts(column) != _facts(declared[column.name]):
            out.append(
                f"feature `{column.name}`: the region declares {_show(_facts(declared[column.name]))}, "
                f"the run sends {_show(_facts(column))}"
            )
    return out


# A region checks the plan with every message, twice (check_request, load): 0.8 ms each on the synthetic
# schema, 0.04 ms from this cache. Frozen schemas hash by value; a refusal raises and is not cached.
@lru_cache(maxsize=64)
def owned_schema(plan: Schema, *, owner: Schema | None, region: str) -> Schema:
    """The schema ``region`` reads its table with for a run that sent ``plan``: the owner's own, with the
    run's choice of the owner's features. Raises :class:`PolicyError` (``wire.REFUSED_SCHEMA``) naming every
    difference when ``plan`` changes anything else, and when the region has no schema of its own."""
    if owner is None:
        raise PolicyError(
            f"region {region}: the region has no schema of its own, so it cannot check the run's: its data owner "
            "names the schema file in the node settings (--node-config 'schema-path=\"/etc/fedcrm/schema.yaml\"')",
            code=wire.REFUSED_SCHEMA,
        )
    differences = schema_differences(plan, owner=owner)
    if differences:
        raise PolicyError(
            f"region {region}: the run's schema `{plan.name}` is not the region's own `{owner.name}`: "
            + "; ".join(differences),
            code=wire.REFUSED_SCHEMA,
        )
    declared = {c.name: c for c in owner.features}
    # model_copy skips validation on purpose: every piece is the owner's, already validated, and a subset
    # of its features keeps every rule of Schema (no duplicates, none reserved, none excluded).
    return owner.model_copy(update={"features": tuple(declared[c.name] for c in plan.features)})
