"""fedcrm from Python (a notebook): run an experiment, load its served model, read a region's budget.

``import fedcrm`` stays light: these functions import torch, Flower and pandas only when called.

    import fedcrm
    run = fedcrm.run("configs/demo.yaml", training__rounds=3)   # or **{"training.rounds": 3}
    run.summary.final_metrics["auc"]; run.metrics               # a DataFrame, one row per round
    model = fedcrm.load_model(run.path)
    model.predict_proba(customers_df); model.explain(customers_df); model.version
    fedcrm.budget("eu", "state")
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from fedcrm.config import ExperimentConfig
    from fedcrm.run_summary import RunSummary
    from fedcrm.scoring import ScoringModel


@dataclass
class Run:
    """A finished run: its folder, its summary, its per-round metrics and its served model."""

    path: Path
    summary: RunSummary

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per round and shard of ``metrics.jsonl``, nested fields as dotted columns."""
        import pandas as pd

        from fedcrm.runs import read_metrics

        return pd.json_normalize(read_metrics(self.path / "metrics.jsonl"))

    @property
    def model(self) -> ScoringModel:
        return load_model(self.path)


def _config(config: str | Path | dict[str, Any] | ExperimentConfig) -> ExperimentConfig:
    from fedcrm.config import ExperimentConfig, load_config
    from fedcrm.yamlio import validate_mapping

    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        # Relative paths in a dict are taken from the working folder, as a notebook user expects.
        return validate_mapping(ExperimentConfig, config, source="<config dict>").resolved(Path.cwd())
    return load_config(config)


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    *,
    out: str | Path | None = None,
    state: str | Path = "state",
    quiet: bool = True,
    ray_address: str | None = None,
    **overrides: Any,
) -> Run:
    """Train in simulation, as ``fedcrm run`` does; ``overrides`` replace config keys before it starts.

    ``ray_address``: run the simulation's ClientApps on this running Ray cluster (``HOST:PORT``), as
    ``fedcrm run --ray-address`` does.

    A key names a config entry with ``__`` or ``.`` between levels (``training__rounds=20``,
    ``**{"privacy.target_epsilon": 1}``); the result is validated like the file and recorded in the
    run's config.yaml. Progress lines go to stderr unless ``quiet``.
    """
    from fedcrm.experiment import materialise_regions
    from fedcrm.fl.simulation import run_simulated

    cfg = _config(config)
    if overrides:
        cfg = cfg.with_overrides({k.replace("__", "."): v for k, v in overrides.items()}, source="fedcrm.run()")
    run_dir = Path(out) if out else cfg.output_dir / cfg.name
    cfg = materialise_regions(cfg, data_dir=run_dir / "regions")
    summary = run_simulated(
        cfg,
        run_dir=run_dir,
        state_root=Path(state),
        ray_address=ray_address,
        report=(lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr)),
    )
    return Run(path=run_dir, summary=summary)


def load_model(run_dir: str | Path, *, schema: str | Path | None = None) -> ScoringModel:
    """The served model of a run (its current version), scoring raw rows through the run's schema."""
    from fedcrm.scoring import ScoringModel

    return ScoringModel.load(run_dir, schema=schema)


def budget(
    region: str, state: str | Path = "state", *, policy: str | Path | None = None, accountant: str | None = None
) -> dict[str, Any]:
    """A region's privacy ledger as ``fedcrm budget --json`` shows it: ε spent, budget, remaining, events."""
    from fedcrm.errors import StorageError
    from fedcrm.governance.policy import load_policy
    from fedcrm.privacy.ledger import PrivacyLedger

    state_dir = Path(state) / region
    if not (state_dir / "privacy_ledger.sqlite").exists():
        raise StorageError(f"no privacy ledger for region {region} under {state} (nothing released yet?)")
    ledger = PrivacyLedger.open(state_dir, region=region)
    rules = load_policy(Path(policy) if policy else None)  # δ and the budget are the region's policy's
    # The accountant too is the policy's, unless the caller asks to see the ledger under another.
    return ledger.summary(delta=rules.delta, accountant=accountant or rules.accountant, budget=rules.privacy_budget)
