"""MLflow tracking against a real local MLflow store (those tests skip when MLflow is not installed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.errors import ConfigError, StorageError
from fedcrm.run_summary import RunSummary
from fedcrm.tracking import flatten, log_run, tracking_uri

STARTED = 1_700_000_000.0  # a run's start time, Unix seconds


def _mlflow() -> Any:
    return pytest.importorskip("mlflow", reason="MLflow is optional: pip install 'fedcrm[tracking]'")


def _finished_run(tmp_path: Path) -> tuple[Path, RunSummary]:
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.json").write_text("{}")
    (run_dir / "model_card.md").write_text("# card\n")
    rows = [
        {
            "round": r,
            "shard": 0,
            "time_s": r,
            "pooled": {"auc": 0.6 + 0.1 * r},
            "regions": {"eu": {"auc": 0.7, "epsilon": 0.5 * r}},
            "epsilon": {"eu": 0.5 * r, "us": 0.4 * r},
        }
        for r in (1, 2)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = RunSummary(
        name="tiny",
        task="churn",
        privacy_mode="sample_dp",
        run_id="tiny-1",
        final_metrics={"auc": 0.8, "customers": 100.0},
        privacy={"eu": {"epsilon": 1.0}, "us": {"epsilon": 0.8}},
        regions={},
        warnings=[],
        config_sha256="0" * 64,
        code_version="abc",
        started=STARTED,
        wall_time_s=5.0,
    )
    (run_dir / "summary.json").write_text(summary.to_json())
    return run_dir, summary


def test_run_logged_to_local_store_in_the_run_folder(tmp_path: Path) -> None:
    mlflow = _mlflow()
    cfg = load_config(write_tiny_config(tmp_path, overrides={"tracking": {"kind": "mlflow"}}))
    run_dir, summary = _finished_run(tmp_path)
    rid = log_run(cfg, run_dir, summary)
    assert rid is not None
    uri = tracking_uri(cfg, run_dir)
    assert uri.startswith("file://") and (run_dir / "mlruns").is_dir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["privacy.target_epsilon"] == "2.0" and run.data.params["training.rounds"] == "2"
    assert run.data.metrics["final_auc"] == 0.8 and run.data.metrics["final_epsilon_us"] == 0.8
    history = client.get_metric_history(rid, "epsilon_eu")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 1.0)]
    # Timestamps are the run's wall clock (start + the row's time_s), not counted from 1970.
    assert [m.timestamp for m in history] == [int(1000 * (STARTED + r)) for r in (1, 2)]
    assert client.get_metric_history(rid, "final_auc")[0].timestamp == int(1000 * (STARTED + 5.0))
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {"summary.json", "model_card.md", "model"} <= arts


def test_summary_without_a_start_time_is_refused_before_anything_is_logged(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, overrides={"tracking": {"kind": "mlflow"}}))
    run_dir, summary = _finished_run(tmp_path)
    summary = replace(summary, started=None)
    with pytest.raises(StorageError, match=r"summary\.json: `started` must be the run's start time"):
        log_run(cfg, run_dir, summary)
    assert not (run_dir / "mlruns").exists()


def test_tracking_off_logs_nothing(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path))
    run_dir, summary = _finished_run(tmp_path)
    assert log_run(cfg, run_dir, summary) is None and not (run_dir / "mlruns").exists()


def test_unknown_tracking_kind_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.kind"):
        load_config(write_tiny_config(tmp_path, overrides={"tracking": {"kind": "wandb"}}))


def test_flatten_uses_dotted_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": []}) == {"a.b": "1", "a.c.d": "None", "e": "[]"}


def test_served_model_logged_as_pyfunc_scores_raw_rows_like_fedcrm_score(tmp_path: Path) -> None:
    """A real tiny run, tracked: the pyfunc model loaded back from MLflow scores the region's raw rows
    exactly as ``fedcrm score`` does, and carries the schema file and model card."""
    mlflow = _mlflow()
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.report import write_run_report

    cfg = load_config(
        write_tiny_config(
            tmp_path, regions={"eu": 300, "us": 300}, overrides={"tracking": {"kind": "mlflow"}, "training.rounds": 1}
        )
    )
    run_dir = tmp_path / "run"
    summary = run_simulated(cfg, run_dir=run_dir, state_root=tmp_path / "state", report=lambda s: None)
    write_run_report(run_dir)
    rid = log_run(cfg, run_dir, summary)
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(
        app, ["score", "--region", "eu", "--model", str(run_dir), "--state", str(tmp_path / "state"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    scored = pd.read_csv(out, dtype={"customer_id": str})

    mlflow.set_tracking_uri(tracking_uri(cfg, run_dir))
    model = mlflow.pyfunc.load_model(f"runs:/{rid}/pyfunc")
    inputs = {c.name: c.type.name for c in model.metadata.get_input_schema().inputs}
    assert inputs["tenure_months"] == "double" and inputs["plan"] == "string" and inputs["autopay"] == "string"
    # MLflow will not narrow int64 to double by itself: numeric columns are read as floats.
    numeric = [n for n, t in inputs.items() if t == "double"]
    raw = pd.read_csv(tmp_path / "data" / "eu.csv", dtype={"customer_id": str} | dict.fromkeys(numeric, float))
    rows = raw.set_index("customer_id").loc[scored["customer_id"]].reset_index()
    predicted = np.asarray(model.predict(rows[list(inputs)]))
    np.testing.assert_allclose(predicted, scored["score"].to_numpy(), rtol=0, atol=1e-12)
    # The rows go through the fedcrm schema: a value outside its declaration is refused, not scored.
    bad = rows[list(inputs)].head(3).copy()
    bad.loc[0, "tenure_months"] = float("nan")  # the schema says tenure is never missing
    with pytest.raises(Exception, match="tenure_months"):
        model.predict(bad)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(rid, "pyfunc/artifacts")}
    assert {"pyfunc/artifacts/synthetic_crm.yaml", "pyfunc/artifacts/model_card.md"} <= arts
