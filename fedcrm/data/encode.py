"""Turning a validated table into model features, from the schema alone.

No statistic of the data enters the encoding: numeric columns are scaled by their *declared* bounds,
categoricals one-hot over their *declared* vocabulary. Two regions therefore encode identically
without exchanging anything, and the encoding of one customer does not depend on any other customer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcrm.data.io import MISSING, OTHER, CustomerTable
from fedcrm.data.schema import BooleanColumn, CategoricalColumn, Column, NumericColumn, Schema


@dataclass(frozen=True)
class FeatureSlot:
    """One encoded feature: which column it comes from and what it means, in the user's words."""

    name: str
    column: str
    kind: str  # "value", "missing", "category"
    category: str | None = None


def _slots(col: Column) -> list[FeatureSlot]:
    if isinstance(col, CategoricalColumn):
        cats = list(col.vocabulary)
        if col.unknown == "other":
            cats.append(OTHER)
        if col.missing in ("indicator", "drop"):
            # `drop` rows never reach the encoder; a slot is kept only for `indicator`.
            cats += [MISSING] if col.missing == "indicator" else []
        return [FeatureSlot(f"{col.name}: {c}", col.name, "category", c) for c in cats]
    slots = [FeatureSlot(col.name, col.name, "value")]
    if col.missing == "indicator":
        slots.append(FeatureSlot(f"{col.name}: missing", col.name, "missing"))
    return slots


class FeatureEncoder:
    """Encodes the schema's model columns into a float32 matrix in [0, 1], in a fixed order."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.slots: list[FeatureSlot] = [s for col in schema.model_columns for s in _slots(col)]

    @property
    def feature_names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def n_features(self) -> int:
        return len(self.slots)

    def encode(self, table: CustomerTable) -> np.ndarray:
        n = len(table)
        x = np.zeros((n, self.n_features), dtype=np.float32)
        j = 0
        for col in self.schema.model_columns:
            values = table.values[col.name].to_numpy()
            if isinstance(col, CategoricalColumn):
                cats = [s.category for s in _slots(col)]
                for k, c in enumerate(cats):
                    x[:, j + k] = values == c
                j += len(cats)
                continue
            v = values.astype(float)
            missing = np.isnan(v)
            if isinstance(col, NumericColumn):
                v = np.clip(v, col.min, col.max)
                if col.log:
                    v = np.log1p(v - col.min) / np.log1p(col.max - col.min)
                else:
                    v = (v - col.min) / (col.max - col.min)
            else:
                assert isinstance(col, BooleanColumn)
            x[:, j] = np.where(missing, 0.0, v)
            j += 1
            if col.missing == "indicator":
                x[:, j] = missing
                j += 1
        return x
