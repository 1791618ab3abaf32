"""A run's served model as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(rows)``.

The pyfunc model carries everything scoring needs and nothing about any customer: the served weights
(``RUN_DIR/model``), the fedcrm schema file the rows go through, and the model card. Its input
signature is read off the fedcrm schema (numeric columns as doubles, categorical and boolean columns as
the table's own spellings, the id optional; MLflow refuses to narrow int64 to double, so read numeric
columns as floats: ``pd.read_csv(f, dtype=dict.fromkeys(numeric, float))``), and ``predict`` validates
raw rows with the schema exactly as ``fedcrm.load_model(...).predict_proba`` does, so the scores are
those ``fedcrm score`` writes.
Consent and erasures are a region's affair and are applied by ``fedcrm score``, not here.

This module imports MLflow, an optional extra; only :mod:`fedcrm.tracking` imports it, after checking.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel
from mlflow.types import ColSpec, TensorSpec
from mlflow.types import Schema as MlflowSchema

from fedcrm.data.schema import NumericColumn, Schema
from fedcrm.errors import ConfigError

PYFUNC_PATH = "pyfunc"  # where the pyfunc model goes among the MLflow run's artifacts


def input_schema(schema: Schema) -> MlflowSchema:
    """MLflow's input schema for raw rows of a fedcrm schema: the id (optional) and the model's columns."""
    cols: list[ColSpec | TensorSpec] = [ColSpec("string", schema.id.column, required=False)] if schema.id.column else []
    # Categorical and boolean values arrive as the table's spellings ("yes", "premium"): strings.
    cols += [ColSpec("double" if isinstance(c, NumericColumn) else "string", c.name) for c in schema.model_columns]
    return MlflowSchema(cols)


class FedcrmPyfunc(PythonModel):  # type: ignore[misc,unused-ignore]
    """The served model behind MLflow's pyfunc interface: raw rows in, served scores (probabilities) out."""

    def load_context(self, context: Any) -> None:
        from fedcrm.scoring import ScoringModel

        self._model = ScoringModel.load(Path(context.artifacts["run"]), schema=context.artifacts["schema"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        # MLflow hands over a DataFrame after enforcing the signature; a dict of columns also works.
        return self._model.predict_proba(pd.DataFrame(model_input))


def save_pyfunc(*, run_dir: Path, schema_path: Path, schema: Schema, dest: Path) -> Path:
    """Write the pyfunc model of ``run_dir``'s served model into ``dest`` (a folder that must not exist)."""
    if not (run_dir / "model" / "model.json").exists():
        raise ConfigError(f"{run_dir}: no served model to log to MLflow (model/model.json is missing)")
    with tempfile.TemporaryDirectory() as tmp:
        # ScoringModel.load reads RUN/model: stage the weights under that name, without the run's other files.
        staged = Path(tmp) / "run"
        shutil.copytree(run_dir / "model", staged / "model")
        artifacts = {"run": str(staged), "schema": str(schema_path)}
        if (run_dir / "model_card.md").exists():
            artifacts["model_card"] = str(run_dir / "model_card.md")
        mlflow.pyfunc.save_model(
            path=str(dest),
            python_model=FedcrmPyfunc(),
            artifacts=artifacts,
            signature=ModelSignature(inputs=input_schema(schema)),
            # Explicit, so MLflow does not load the model in a subprocess to guess what it imports.
            pip_requirements=["fedcrm"],
        )
    return dest
