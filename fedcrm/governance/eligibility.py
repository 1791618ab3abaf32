"""Which customers of a region's table may be used for a purpose: not forgotten, consenting, not withdrawn.

One rule for every use of a region's customers (training, evaluation, scoring): a tombstoned customer
is never used again; a customer whose consent column refuses the purpose, or who withdrew consent to it
later (``fedcrm consent withdraw``, which holds even when a re-imported table still says yes), is not
used for that purpose.
"""

from __future__ import annotations

from pathlib import Path

from fedcrm.data.io import CustomerTable
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.unlearning.tombstones import EVERY_PURPOSE, Tombstones


def usable_for(
    table: CustomerTable, *, purpose: str, tombstones: Tombstones, withdrawals: ConsentWithdrawals
) -> tuple[CustomerTable, dict[str, int]]:
    """The rows of ``table`` usable for ``purpose``, and counts of what was left out and why.

    Counts: ``customers_in_table``, ``forgotten``, and ``excluded_no_consent`` when the schema gates
    the purpose or someone withdrew.
    """
    counts = {"customers_in_table": len(table)}
    # Both lists hold keyed hashes of ids: when both are in use, each id is hashed once, not twice
    # (the hash is the largest cost of scoring a million customers once anyone was forgotten).
    both = bool(tombstones.keyed.tokens(EVERY_PURPOSE)) and bool(withdrawals.keyed.tokens(purpose))
    digests = tombstones.keyed.digests(table.ids) if both else None
    forgotten = tombstones.mask(table.ids, digests=digests)
    counts["forgotten"] = int(forgotten.sum())
    table, digests = table.subset(~forgotten), None if digests is None else digests[~forgotten]
    if table.schema.consent_for(purpose) is not None:
        granted = table.consent[purpose].to_numpy(dtype=bool)
        counts["excluded_no_consent"] = int((~granted).sum())
        table, digests = table.subset(granted), None if digests is None else digests[granted]
    withdrawn = withdrawals.mask(table.ids, purpose=purpose, digests=digests)
    if withdrawn.any():
        counts["excluded_no_consent"] = counts.get("excluded_no_consent", 0) + int(withdrawn.sum())
        table = table.subset(~withdrawn)
    return table, counts


def region_filters(state_dir: Path) -> tuple[Tombstones, ConsentWithdrawals]:
    """The region's tombstones and consent withdrawals, from its state folder."""
    return Tombstones(Path(state_dir)), ConsentWithdrawals(Path(state_dir))
