"""What a server can observe of a region besides its DP answers: declared sizes, and refusals on them.

The rule (README, "How privacy is accounted"): after a region reads its data, nothing the server can
observe depends on the data except DP answers charged first. So every size the server sees, and every
size a refusal compares, is a *declared* figure: the data owner's ``declared_customers``, else the
count rounded to the policy's public step (:meth:`RegionPolicy.declared_size`); a shard's size is the
declared size over the shard count, never a count of the shard. (Failures after the table is read are
one fixed code, and do not depend on the run's choices: see ``Region.load`` and ``Region._declared_schema``.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from fedcrm import wire
from fedcrm.errors import PolicyError
from fedcrm.governance.policy import RegionPolicy


def declared_training(policy: RegionPolicy, *, counted: Callable[[], int]) -> int:
    """The region's training customers as the server may know them.

    The owner's ``declared_customers`` when the policy has one (then ``counted`` is not called, and no
    row is read); else the count ``counted()`` returns, as the policy declares counts (rounded to its
    step at every size, or exact where the owner chose so).
    """
    if policy.declared_customers is not None:
        return policy.declared_customers
    return policy.declared_size(counted())


def declared_shard_size(*, declared: int, shards: int) -> int:
    """A shard's size as the server may know it: the declared training size split evenly.

    Shards are drawn by a keyed hash, so each holds about 1/S of the customers; a shard's own count
    would move with every erasure in it (at S = 24 a shard of 19 read 18 after one erasure, at ε = 0).
    """
    return declared // shards


def check_declared_shard(policy: RegionPolicy, *, region: str, shard: int, declared: int) -> None:
    """Refuse a round whose shard is, as declared, below the policy's minimum or too small for its δ.

    Both compare the declared size: a refusal on the exact count would flip with one erasure at the
    boundary and tell the server so for free. A shard whose exact count is below the minimum still
    trains: DP-SGD's guarantee to each customer rests on q (the batch over the declared size), σ and
    the steps, not on how many others the shard holds. The exact count goes to the region's audit log.
    """
    if declared < policy.min_customers:
        raise PolicyError(
            f"region {region}: shard {shard} is declared at {declared} training customers, fewer than the "
            f"policy's minimum {policy.min_customers} behind any update",
            code=wire.REFUSED_SHARD_SIZE,
        )
    if policy.delta >= 1.0 / declared:
        raise PolicyError(
            f"region {region}: the policy's δ = {policy.delta:g} is not below 1/N = {1 / declared:.3g} for "
            f"shard {shard}'s {declared} declared customers: a release could then reveal a customer outright; "
            "lower δ",
            code=wire.REFUSED_SHARD_SIZE,
        )


def warn_if_exact_sizes(policy: RegionPolicy, *, region: str) -> None:
    """Warn where the owner publishes exact sizes: it runs, and the owner is told which guarantee it weakens."""
    if policy.public_size == "exact" and policy.declared_customers is None:
        warnings.warn(
            f"region {region}: the policy publishes exact sizes (public_size: exact): one erasure or withdrawal "
            "then changes what the server sees, at no ε; leave public_size at `rounded`, or declare "
            "declared_customers",
            UserWarning,
            stacklevel=3,
        )
