"""Preparing an experiment's regions in simulation (the machine plays every data owner)."""

from __future__ import annotations

from pathlib import Path

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import load_schema
from fedcrm.data.split import SplitMethod, split_table
from fedcrm.errors import ConfigError


def materialise_regions(cfg: ExperimentConfig, *, data_dir: Path) -> ExperimentConfig:
    """A config whose ``regions`` point at real files: made by splitting ``cfg.split.input`` if asked."""
    if cfg.split is None:
        missing = {r: str(p) for r, p in cfg.regions.items() if not p.exists()}
        if missing:
            raise ConfigError(f"`regions`: data file(s) not found: {missing}")
        return cfg
    sp = cfg.split
    if not sp.input.exists():
        raise ConfigError(f"`split.input`: {sp.input} not found")
    split_table(
        schema=load_schema(cfg.schema_path),
        input_path=sp.input,
        regions=list(sp.regions),
        method=SplitMethod.parse(sp.by),
        seed=sp.seed,
        out_dir=data_dir,
    )
    return cfg.model_copy(update={"regions": {r: (data_dir / f"{r}.csv").resolve() for r in sp.regions}})
