"""The served model of a run, loaded from its run directory for use at a data owner's side.

``RUN_DIR/model`` holds one weight file per SISA constituent and ``model.json`` (kind, hidden sizes,
feature names, the run's config). The served score is the mean of the constituents' probabilities.
"""

from __future__ import annotations

import json
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
from fedcrm.runs import load_weights


@dataclass
class ServedModel:
    models: list[nn.Module]
    kind: str
    feature_names: list[str]
    config: dict[str, Any]
    version: int = 1

    @classmethod
    def load(cls, run_dir: Path) -> ServedModel:
        meta_path = run_dir / "model" / "model.json"
        if not meta_path.exists():
            raise StorageError(f"{meta_path}: no served model here (is {run_dir} a finished run folder?)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            spec = ModelConfig(kind=meta["kind"], hidden=tuple(meta["hidden"]))
            shards, names = list(meta["shards"]), list(meta["feature_names"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{meta_path}: damaged model description ({e})") from None
        models = []
        for k in shards:
            m = build_model(spec, n_features=len(names), seed=0)
            try:
                set_weights(m, load_weights(run_dir / "model" / f"constituent-{k}.npz"))
            except ValueError as e:
                raise StorageError(f"{run_dir / 'model'}: constituent {k} does not fit model.json ({e})") from None
            models.append(m)
        return cls(models=models, kind=spec.kind, feature_names=names, config=dict(meta.get("config", {})),
                   version=int(meta.get("version", 1)))

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
