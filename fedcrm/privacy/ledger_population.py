"""Who a ledger event read, in the hold-out mask's own integers.

A release reads the training customers or the hold-out, as split by the region's hold-out fraction. The
mask holds a customer out when their keyed bucket in ``[0, HOLDOUT_SCALE)`` is below
``int(fraction · HOLDOUT_SCALE)`` (:func:`fedcrm.unlearning.shards.holdout_mask`); the ledger records that
integer (``train:200000/1000000``), so two fractions are one hold-out in the ledger exactly when they hold
out the same customers. Before 0.2.0 the label held ``%g`` of the fraction, and 0.1999996 and 0.2 (buckets
below 199999 and below 200000) both read ``0.2``.
"""

from __future__ import annotations

from fedcrm.privacy.ledger_store import POPULATION_HOLDOUT, POPULATION_TRAIN

HOLDOUT_SCALE = 1_000_000


def holdout_threshold(fraction: float) -> int:
    """The integer the hold-out mask compares a customer's bucket with: what the ledger records, so that two
    fractions are the same hold-out in the ledger exactly when they are the same customers."""
    return int(fraction * HOLDOUT_SCALE)


def population_label(kind: str, *, holdout_fraction: float) -> str:
    """``train:<threshold>/<scale>`` or ``holdout:<threshold>/<scale>``: who an event read, in the mask's integers."""
    if kind not in (POPULATION_TRAIN, POPULATION_HOLDOUT):
        raise ValueError(f"population must be '{POPULATION_TRAIN}' or '{POPULATION_HOLDOUT}', got {kind!r}")
    return f"{kind}:{holdout_threshold(holdout_fraction)}/{HOLDOUT_SCALE}"


def population_threshold(population: str) -> int:
    """The hold-out threshold a population label was recorded under.

    Labels before 0.2.0 held the fraction as ``%g`` (``train:0.2``): it is read as the fraction it shows,
    which is exactly the policy's for a fraction of up to six significant digits (its ``%g`` text reads back
    as the same float); a longer one was rounded, and no shipped or documented policy had one.
    """
    _, _, value = population.partition(":")
    threshold, slash, scale = value.partition("/")
    try:
        if slash:
            if int(scale) != HOLDOUT_SCALE:
                raise ValueError(f"scale {scale}, expected {HOLDOUT_SCALE}")
            return int(threshold)
        return holdout_threshold(float(value))
    except ValueError as exc:
        raise ValueError(
            f"population must be <kind>:<threshold>/{HOLDOUT_SCALE} (or <kind>:<fraction> before 0.2.0), "
            f"got {population!r}: {exc}"
        ) from exc
