"""Exact small counts (issue 23, item 5): a server reads a region's sizes off its pre-flight and its
training replies, and one erasure off their change, at zero ε.

Each attack drives region ``eu`` through its ClientApp (``fedcrm.fl.client.answer``) on real files; a
reply is compared by what the server can read off it without noise (status and public figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from region_probes import ask, node, owner_region, seen, tiny_federation

from fedcrm import wire
from fedcrm.data.schema import load_schema
from fedcrm.governance.policy import RegionPolicy
from fedcrm.region import Region
from fedcrm.unlearning.tombstones import Tombstones

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

SHARDS = 24  # the setting: ~20 training customers a shard in a region of 600-700
# A policy that lets a run ask for 24 shards (policies before 0.2.0 had no allowed_shards: any S up to 64
# was served, so the attacks below replay on the old code as they were found).
ALLOW_24 = {"allowed_shards": [1, 2, 4, SHARDS]} if "allowed_shards" in RegionPolicy.model_fields else {}


def _owner_view(tmp_path: Path, cfg, state: str, policy: dict) -> tuple[Region, object]:  # noqa: ANN001
    """The region as its data owner sees it (exact counts), on the same files and state as the node."""
    region = owner_region(node(tmp_path, data=Path(cfg.regions["eu"]), state=state, policy=policy))
    return region, region.load(cfg, load_schema(cfg.schema_path))


def test_erasure_of_one_customer_at_24_shards_changes_no_reply(tmp_path: Path) -> None:
    """Before: `smallest-shard` was the exact count of the smallest of 24 shards (19), and a training
    reply's weight the exact count of its shard: erasing one of its customers moved both by 1, at ε = 0.
    Now every figure is the declared size (rounded to 100) over S: the same before and after."""
    policy = ALLOW_24
    cfg, table = tiny_federation(tmp_path, customers=700, overrides={"unlearning.shards": SHARDS})
    context = node(tmp_path, data=table, policy=policy)
    region, data = _owner_view(tmp_path, cfg, "state", policy)
    sizes = np.array([int((~data.holdout & (data.shard == k)).sum()) for k in range(SHARDS)])
    smallest = int(sizes.argmin())
    before = {kind: seen(ask(kind, cfg, context, shard=smallest, run_id="before")) for kind in ("describe", "train")}
    print(f"smallest of {SHARDS} shards: {sizes.min()} customers (exact); server read {before['describe']}")

    one = data.ids[~data.holdout & (data.shard == smallest)][0]
    Tombstones(tmp_path / "state").add([str(one)])
    after = {kind: seen(ask(kind, cfg, context, shard=smallest, run_id="after")) for kind in ("describe", "train")}
    for reply in (*before.values(), *after.values()):
        reply.pop("metrics/epsilon", None)  # the ledger's ε: moved by the round trained in between, not the erasure
    assert after == before
    assert after["train"]["status/outcome"] == wire.OUTCOME_OK  # declared 500 / 24 = 20 a shard: it trains


def test_smallest_shard_and_sizes_are_declared_figures_not_counts(tmp_path: Path) -> None:
    """Before: a region of 600 answered `train` 480 (2 significant digits, exact below 100) and
    `smallest-shard` its exact 19 at S = 24. Now: the size rounded to the public step, and that over S."""
    policy = ALLOW_24
    cfg, table = tiny_federation(tmp_path, customers=600, overrides={"unlearning.shards": SHARDS})
    described = seen(ask("describe", cfg, node(tmp_path, data=table, policy=policy)))
    _, data = _owner_view(tmp_path, cfg, "state", policy)
    exact = data.counts["train"]
    assert described["metrics/train"] == round(exact / 100) * 100
    assert described["metrics/smallest-shard"] == described["metrics/train"] // SHARDS


def test_a_small_region_declares_no_count_of_its_customers(tmp_path: Path) -> None:
    """Before: 40 training customers were declared as 40 (exact below 100). Now: 0, as any region
    below half the public step, and refused on that declared size."""
    cfg, table = tiny_federation(tmp_path, customers=50)
    context = node(tmp_path, data=table)
    described = seen(ask("describe", cfg, context))
    assert described["metrics/train"] == 0.0
    assert seen(ask("train", cfg, context))["status/reason"] == wire.REFUSED_SHARD_SIZE


def test_a_size_refusal_at_the_minimum_does_not_flip_with_one_erasure(tmp_path: Path) -> None:
    """The owner's minimum sits exactly at the shard's count. Before: the round trained, and after one
    erasure it was refused (below-minimum-shard-size): one erasure read off a refusal. Now the refusal
    compares the declared size, which the erasure does not move."""
    cfg, table = tiny_federation(tmp_path, customers=600)
    region, data = _owner_view(tmp_path, cfg, "state", {})
    exact = data.counts["train"]
    policy = {"min_customers": exact}
    context = node(tmp_path, data=table, policy=policy)
    before = seen(ask("train", cfg, context, run_id="before"))
    Tombstones(tmp_path / "state").add([str(data.ids[~data.holdout][0])])
    after = seen(ask("train", cfg, context, run_id="after"))
    for reply in (before, after):
        reply.pop("metrics/epsilon", None)
    assert after == before


def test_a_shard_count_outside_allowed_shards_is_refused_before_the_table_is_read(tmp_path: Path) -> None:
    """The config allows up to 64 shards. Before: a region answered S = 64 (on its table) or failed on
    a missing one; now the policy's allowed_shards refuses it from the plan alone, table or none."""
    cfg, table = tiny_federation(tmp_path, customers=300, overrides={"unlearning.shards": 64})
    replies = [
        seen(ask(kind, cfg, node(tmp_path, data=path, state=f"{kind}-{i}")))
        for kind in ("describe", "train")
        for i, path in enumerate((table, tmp_path / "no-table.csv"))
    ]
    assert all(r == replies[0] for r in replies)
    assert replies[0]["status/reason"] == "shard-count-not-allowed"


def test_a_declared_size_answers_the_preflight_without_reading_the_table(tmp_path: Path) -> None:
    """With `declared_customers` in the policy the pre-flight reads no row: no table, or any table,
    gives the owner's figure. Before: the policy had no such field (the region could not start)."""
    cfg, table = tiny_federation(tmp_path, customers=300, overrides={"unlearning.shards": 4})
    policy = {"declared_customers": 5000}
    replies = [
        seen(ask("describe", cfg, node(tmp_path, data=path, state=f"s{i}", policy=policy)))
        for i, path in enumerate((table, tmp_path / "no-table.csv"))
    ]
    assert replies[0] == replies[1]
    assert replies[0]["metrics/train"] == 5000.0 and replies[0]["metrics/smallest-shard"] == 1250.0


def test_a_policy_publishing_exact_sizes_warns(tmp_path: Path) -> None:
    cfg, table = tiny_federation(tmp_path, customers=300)
    context = node(tmp_path, data=table, policy={"public_size": "exact"})
    with pytest.warns(UserWarning, match="exact sizes"):
        owner_region(context)
