"""The non-private centralised baseline: what the model reaches if every region's data were pooled.

It answers "what does federation and privacy cost?" and is never a way to train in production: it
reads every region's table in one process, which is exactly what fedcrm exists to avoid. Each region's
customers go through the same preparation as in a federated run, from the region's own state folder
(``STATE/REGION``, as ``fedcrm run --state`` lays it out): its tombstones and consent withdrawals,
consent for the purpose, the hold-out chosen by the same seeded hash of the id. The same model is
trained without DP on all training rows for as many passes as the federated run makes (rounds × local
epochs), and it is evaluated on the pooled hold-out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.metrics import ScoreSummary
from fedcrm.models import build_model, predict_proba
from fedcrm.node_settings import region_settings
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.region import Region
from fedcrm.run_summary import CENTRALISED, RunSummary
from fedcrm.runs import RunDir, code_version
from fedcrm.training import train_locally


def run_centralised(cfg: ExperimentConfig, *, run_dir: Path, state_root: Path) -> RunSummary:
    """Train on the pooled training rows of every region; write summary.json like a federated run.

    ``state_root`` holds every region's state, one sub-folder per region: the customers a region has
    forgotten or whose consent it has withdrawn there are left out, as a federated run leaves them out.
    """
    t0 = time.time()
    schema = load_schema(cfg.schema_path)
    run = RunDir.create(run_dir, cfg)
    xs, ys, hx, hy, regions = [], [], [], [], {}
    for name, settings in region_settings(cfg, state_root=state_root).items():
        # The region's real state: a throw-away folder would pool its forgotten customers back in. The
        # baseline trains without DP, so it charges nothing to the region's ledger.
        data = Region(settings).load(cfg, schema)
        xs.append(data.x[~data.holdout])
        ys.append(data.y[~data.holdout])
        hx.append(data.x[data.holdout])
        hy.append(data.y[data.holdout])
        regions[name] = dict(data.counts)
    x, y = np.concatenate(xs), np.concatenate(ys)
    model = build_model(cfg.model, n_features=x.shape[1], seed=cfg.seed * 1000)
    epochs = cfg.training.rounds * cfg.training.local_epochs
    training = cfg.training.model_copy(update={"local_epochs": epochs})
    result = train_locally(
        model, x=x, y=y, training=training, dp=None, randomness=ReleaseRandomness.public_seed(cfg.seed)
    )
    holdout_x, holdout_y = np.concatenate(hx), np.concatenate(hy)
    metrics = ScoreSummary.of(scores=predict_proba(model, holdout_x), labels=holdout_y).metrics()
    summary = RunSummary(
        name=cfg.name,
        kind=CENTRALISED,
        task=cfg.task,
        privacy_mode="none",
        final_metrics={k: metrics[k] for k in ("auc", "log_loss", "accuracy", "brier", "customers") if k in metrics},
        privacy={},
        regions=regions,
        training={"epochs": epochs, "examples": result.examples, "steps": result.steps},
        warnings=[
            "centralised baseline: every region's data pooled in one place, no differential privacy; "
            "a reference point only"
        ],
        config_sha256=cfg.digest(),
        code_version=code_version(),
        started=t0,  # when this run began (Unix seconds), as in a federated run's summary
        wall_time_s=round(time.time() - t0, 2),
    )
    run.write_summary(summary)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "pooled": summary.final_metrics}) + "\n")
    return summary
