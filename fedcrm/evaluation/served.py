"""The served model of a run, loaded from its run directory for use at a data owner's side.

``RUN_DIR/model`` holds one weight file per SISA constituent and ``model.json`` (kind, hidden sizes,
feature names, the run's config). The served score is the mean of the constituents' probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedcrm.config import ModelConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import Schema
from fedcrm.errors import StorageError
from fedcrm.models import build_model, ensemble_proba, set_weights
from fedcrm.runs import MODEL_META, ModelMeta, load_weights


@dataclass
class ServedModel:
    models: list[nn.Module]
    kind: str
    feature_names: list[str]
    config: dict[str, Any]
    version: int = 1

    @classmethod
    def load(cls, run_dir: Path) -> ServedModel:
        meta = ModelMeta.read(run_dir)
        try:
            spec = ModelConfig(kind=meta.kind, hidden=meta.hidden)
        except ValueError as e:
            raise StorageError(f"{run_dir / MODEL_META}: damaged model description ({e})") from None
        names = meta.feature_names
        models = []
        for k in meta.shards:
            m = build_model(spec, n_features=len(names), seed=0)
            try:
                set_weights(m, load_weights(run_dir / "model" / f"constituent-{k}.npz"))
            except ValueError as e:
                raise StorageError(f"{run_dir / 'model'}: constituent {k} does not fit model.json ({e})") from None
            models.append(m)
        return cls(models=models, kind=spec.kind, feature_names=names, config=meta.config, version=meta.version)

    def schema_path(self) -> Path | None:
        """The schema file the run was trained with, as its config recorded it."""
        recorded = self.config.get("schema")
        return Path(recorded) if recorded else None

    def region_data(self, region: str) -> Path | None:
        """The region's table as the (simulated) run recorded it, if it did."""
        recorded = self.config.get("regions", {}).get(region)
        return Path(recorded) if recorded else None

    def check_schema(self, schema: Schema) -> None:
        """Refuse a schema whose encoding differs from the one the model was trained on."""
        names = FeatureEncoder(schema).feature_names
        if names != self.feature_names:
            diff = sorted(set(names) ^ set(self.feature_names))[:5]
            raise StorageError(
                f"the model was trained on a different encoding than schema {schema.name} gives "
                f"(features differing: {diff or 'same features, other order'}); use the run's own schema"
            )

    def proba(self, x: np.ndarray) -> np.ndarray:
        return ensemble_proba(self.models, x)
