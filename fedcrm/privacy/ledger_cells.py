"""Composition over cells: which of a region's releases read which customers.

A customer's ε is the composition of every event whose shard contained them. The customers with the same
shard index under every partition used (a *cell*) share one history; the hold-out is one more cell. This
module only groups a ledger's events into those histories; composing them is the accountant's job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from fedcrm.privacy.accountant import Release
from fedcrm.privacy.ledger_population import population_threshold
from fedcrm.privacy.ledger_store import POPULATION_HOLDOUT, LedgerEvent

# Beyond this many cells the worst cell is bounded by composing every event (each customer's history
# is a subset of all events): looser, never lower.
MAX_CELLS = 4096


def cells(
    events: Sequence[LedgerEvent], *, fixed: tuple[int, int] | None = None, holdout: bool | None = None
) -> list[list[Release]]:
    """The histories of the cells: customers whom the same events read.

    The training customers split into cells by their shard under every partition used; the hold-out
    (never trained on while the region keeps one hold-out fraction) is one more cell, read by the
    evaluation releases. ``fixed = (S, k)`` keeps only training cells inside shard k of partition S;
    ``holdout`` True keeps only the hold-out cell, False only training cells. Beyond
    :data:`MAX_CELLS` cells, or once the region's hold-out fraction changed (so that a customer may
    have been in both), one history of every event bounds them all.
    """
    # Compared as the mask's integer threshold: two fractions are one hold-out exactly when they hold out
    # the same customers (and a label from before 0.2.0, written with %g, reads as the same threshold).
    thresholds = {population_threshold(e.population) for e in events if e.population}
    if len(thresholds) > 1:
        return [[event.release for event in events]]
    everyone: list[Release] = []  # events that read every customer (no population recorded)
    all_trained: list[Release] = []  # events that read every training customer (S = 1)
    held_out: list[Release] = []
    by_partition: dict[int, dict[int, list[Release]]] = {}
    for event in events:
        if event.population and event.population.startswith(POPULATION_HOLDOUT):
            held_out.append(event.release)
            continue
        part = event.partition
        if part is None:
            (all_trained if event.population else everyone).append(event.release)
        else:
            by_partition.setdefault(part[0], {}).setdefault(part[1], []).append(event.release)
    holdout_cell = [everyone + held_out] if holdout is not False and fixed is None else []
    everyone = everyone + all_trained
    if holdout:
        return holdout_cell
    if fixed is not None and fixed[0] > 1:
        by_partition.setdefault(fixed[0], {})
    sizes = sorted(by_partition)
    choices = [[fixed[1]] if fixed is not None and size == fixed[0] else list(range(size)) for size in sizes]
    if math.prod(len(c) for c in choices) > MAX_CELLS:
        return [[event.release for event in events]]
    return holdout_cell + [
        everyone + [r for size, k in zip(sizes, cell, strict=True) for r in by_partition[size].get(k, [])]
        for cell in itertools.product(*choices)
    ]
