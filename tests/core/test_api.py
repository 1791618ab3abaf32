"""The notebook API: the README's example runs as printed, on a tiny synthetic federation, and
``import fedcrm`` stays light.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from fedcrm.data.synthetic import generate


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python (notebooks)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README's Python section has no ```python block"
    return match.group(1)


def test_import_fedcrm_loads_neither_torch_nor_flower_nor_pandas() -> None:
    code = "import sys, fedcrm; print([m for m in ('torch', 'flwr', 'pandas') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_readme_example_runs_on_a_tiny_federation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    generate(regions=["eu", "us", "apac"], customers=[400, 300, 300], seed=0, out_dir=tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "pooled AUC" in printed and "model version 1" in printed
    scores = namespace["customers"]["churn_score"]  # type: ignore[index]
    assert len(scores) == 5 and scores.between(0, 1).all()
    # The override went into the run's recorded config, and the model scores as the served model does.
    assert "rounds: 2" in (tmp_path / "runs" / "notebook" / "config.yaml").read_text()
    model = namespace["model"]
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.io import load_table

    table = load_table(tmp_path / "data" / "demo" / "eu.csv", model.schema)  # type: ignore[attr-defined]
    expected = model.served.proba(FeatureEncoder(model.schema).encode(table))[:5]  # type: ignore[attr-defined]
    # float32 models: 5 rows and the whole table go through different BLAS blockings (1-ulp differences).
    np.testing.assert_allclose(scores.to_numpy(), expected, rtol=1e-6, atol=0)


def test_predict_proba_validates_raw_rows_like_a_file(tmp_path: Path) -> None:
    from fedcrm.errors import DataError
    from fedcrm.scoring import ScoringModel

    model = _tiny_model(tmp_path)
    rows = pd.DataFrame({"customer_id": ["a"], "tenure_months": ["abc"]})
    with pytest.raises(DataError, match="expected column"):
        model.predict_proba(rows)
    generate(regions=["eu"], customers=50, seed=1, out_dir=tmp_path / "d")
    good = pd.read_csv(tmp_path / "d" / "eu.csv", dtype=str, keep_default_na=False)
    good.loc[3, "tenure_months"] = "abc"
    with pytest.raises(DataError, match="column `tenure_months`: expected a number, found 'abc'"):
        model.predict_proba(good.drop(columns=["churned", "consent_churn", "gender"]))
    assert isinstance(model, ScoringModel)


def _tiny_model(tmp_path: Path):  # noqa: ANN202
    from fedcrm.config import load_config
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.schema import load_schema
    from fedcrm.models import build_model, get_weights
    from fedcrm.runs import RunDir
    from fedcrm.scoring import ScoringModel

    cfg = load_config(REPO / "configs" / "demo.yaml")
    enc = FeatureEncoder(load_schema(cfg.schema_path))
    RunDir.create(tmp_path / "run", cfg).save_model(
        constituents={0: get_weights(build_model(cfg.model, n_features=enc.n_features, seed=0))},
        feature_names=enc.feature_names,
        version=1,
    )
    return ScoringModel.load(tmp_path / "run")
