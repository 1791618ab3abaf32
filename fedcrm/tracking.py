"""Optional experiment tracking with MLflow (``tracking: {kind: mlflow, uri: ...}`` in the config).

Logging happens after the run, from the run folder, on the server's side: parameters (the flattened
config), per-round metrics (pooled and per region), ε per region per round, final metrics, and the
artifacts (report, model card, model, summary), and the served model as an MLflow pyfunc model
(:mod:`fedcrm.mlflow_model`) that ``mlflow.pyfunc.load_model("runs:/RID/pyfunc")`` scores raw rows
with. Nothing here touches a region or its data. Without
a ``uri`` the store is a local file store in the run folder (``RUN_DIR/mlruns``), which MLflow 3 keeps
in maintenance mode: fedcrm opts in to it explicitly (``MLFLOW_ALLOW_FILE_STORE``).

MLflow is an optional extra (``pip install 'fedcrm[tracking]'``); asking for it without it installed
is a :class:`ConfigError` that says how to install it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedcrm.config import ExperimentConfig
from fedcrm.errors import ConfigError, StorageError
from fedcrm.run_summary import RunSummary
from fedcrm.runs import read_metrics

MAX_PARAM = 500  # MLflow's limit on a parameter value's length


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = str(v)[:MAX_PARAM]
    return out


def tracking_uri(cfg: ExperimentConfig, run_dir: Path) -> str:
    return cfg.tracking.uri or (run_dir.resolve() / "mlruns").as_uri()


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl row as flat MLflow metrics (names MLflow accepts: no spaces)."""
    out: dict[str, float] = {}
    for k, v in row.get("pooled", {}).items():
        out[f"pooled_{k}"] = float(v)
    for region, m in row.get("regions", {}).items():
        for k, v in m.items():
            if isinstance(v, int | float):
                out[f"{region}_{k}"] = float(v)
    for region, e in row.get("epsilon", {}).items():
        out[f"epsilon_{region}"] = float(e)
    return out


def _log_pyfunc(client: Any, rid: str, cfg: ExperimentConfig, run_dir: Path) -> None:
    """The served model as an MLflow pyfunc model (``runs:/RID/pyfunc``) that scores raw rows."""
    import tempfile

    from fedcrm.data.schema import load_schema
    from fedcrm.mlflow_model import PYFUNC_PATH, save_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        dest = save_pyfunc(
            run_dir=run_dir,
            schema_path=cfg.schema_path,
            schema=load_schema(cfg.schema_path),
            dest=Path(tmp) / PYFUNC_PATH,
        )
        client.log_artifacts(rid, str(dest), artifact_path=PYFUNC_PATH)


def log_run(cfg: ExperimentConfig, run_dir: Path, summary: RunSummary) -> str | None:
    """Log a finished run to MLflow when the config asks for it; returns the MLflow run id (or None)."""
    if cfg.tracking.kind != "mlflow":
        return None
    started = summary.started
    if not isinstance(started, int | float) or isinstance(started, bool):
        # Without it every timestamp below would count from 1970.
        raise StorageError(
            f"{run_dir / 'summary.json'}: `started` must be the run's start time in Unix seconds, got "
            f"{started!r}; the summary was written by an older fedcrm: run it again to track it"
        )
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "tracking.kind is mlflow but MLflow is not installed: pip install 'fedcrm[tracking]' "
            "(or mlflow-skinny), or remove the `tracking` section"
        ) from None
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = tracking_uri(cfg, run_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = cfg.tracking.experiment or cfg.name
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run = client.create_run(
        exp_id,
        run_name=summary.run_id or cfg.name,
        tags={
            "fedcrm.privacy_mode": cfg.privacy.mode,
            "fedcrm.code_version": summary.code_version,
            "fedcrm.config_sha256": cfg.digest(),
        },
    )
    rid = run.info.run_id
    try:
        params = flatten(cfg.to_dict())
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(rid, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
        rows = read_metrics(run_dir / "metrics.jsonl")
        for step, row in enumerate(rows, start=1):
            ts = int(1000 * (started + row.get("time_s", 0)))
            metrics = [mlflow.entities.Metric(k, v, ts, step) for k, v in round_metrics(row).items()]
            if metrics:
                client.log_batch(rid, metrics=metrics)
        ended = int(1000 * (started + summary.wall_time_s))
        final = [mlflow.entities.Metric(f"final_{k}", float(v), ended, 0) for k, v in summary.final_metrics.items()]
        final += [
            mlflow.entities.Metric(f"final_epsilon_{r}", eps, ended, 0)
            for r, eps in summary.epsilon_by_region().items()
        ]
        if final:
            client.log_batch(rid, metrics=final)
        for name_ in ("summary.json", "config.yaml", "report.html", "report.md", "model_card.md"):
            if (run_dir / name_).exists():
                client.log_artifact(rid, str(run_dir / name_))
        if (run_dir / "model").is_dir():
            client.log_artifacts(rid, str(run_dir / "model"), artifact_path="model")
            _log_pyfunc(client, rid, cfg, run_dir)
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return str(rid)
