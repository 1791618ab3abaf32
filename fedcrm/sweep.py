"""Sweeps: one base experiment, a grid over config keys, a list of seeds; one independent run per cell.

A sweep file::

    name: epsilon_sweep_telco
    base: ../configs/churn_telco_dp.yaml     # relative to the sweep file
    fixed: {training.rounds: 5}             # dotted overrides for every cell
    grid:
      privacy.target_epsilon: [0.5, 1, 2, 4, 8, none]   # `none`: privacy.mode none (no DP)
      # a value may be a mapping of overrides, shown under its `label`:
      # privacy: [{label: sample_dp, privacy.mode: sample_dp}, {label: none, privacy.mode: none}]
    seeds: [0, 1, 2]
    baselines: [centralised]                 # pooled, non-private, same model, per seed
    engine: shared                           # shared: one simulation engine for many cells; per_cell

Layout of the sweep folder::

    SWEEP_DIR/sweep.json            the sweep as run, cells, engine timings
    SWEEP_DIR/results.csv|.parquet  one row per cell: parameters, final metrics, ε per region, wall time
    SWEEP_DIR/runs/CELL/            an ordinary run folder (summary.json, metrics.jsonl, model/ ...)
    SWEEP_DIR/state/CELL/REGION/    that cell's own region state: its own privacy ledger
    SWEEP_DIR/data/SPLIT/           region files made from a `split:` section, shared by cells

Cells are independent experiments: each has its own state folder, so no ledger composes over two
cells. A cell is complete when its summary.json exists and names the cell's config digest; complete
cells are not rerun. An incomplete cell is started afresh (its state folder is emptied first, so an
interrupted attempt never counts against it). A failing cell is recorded with its error and the sweep
goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.errors import ConfigError, FedcrmError, StorageError
from fedcrm.run_summary import RunSummary
from fedcrm.yamlio import read_yaml_mapping, validate_mapping

Report = Callable[[str], None]
NONE_VALUES = ("none", "None", "off", None)
EPSILON_KEY = "privacy.target_epsilon"
CENTRALISED = "centralised"


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base: Path
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    baselines: list[Literal["centralised"]] = Field(default_factory=list)
    engine: Literal["shared", "per_cell"] = "shared"
    output_dir: Path = Path("runs/sweeps")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key `{key}` has no values")
        return grid


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    spec = validate_mapping(SweepSpec, read_yaml_mapping(path), source=str(path))
    base = spec.base if spec.base.is_absolute() else (path.parent / spec.base).resolve()
    out = spec.output_dir if spec.output_dir.is_absolute() else (path.parent / spec.output_dir).resolve()
    fixed = dict(spec.fixed)
    if isinstance(fixed.get("policies"), dict):
        # The regions' policy files (a sweep with a non-private cell needs policies that allow it),
        # relative to the sweep file like `base`.
        fixed["policies"] = {r: str((path.parent / p).resolve()) for r, p in fixed["policies"].items()}
    if isinstance(fixed.get("region_schemas"), dict):
        # The simulated data owners' own schema files, relative to the sweep file like their policies.
        fixed["region_schemas"] = {r: str((path.parent / p).resolve()) for r, p in fixed["region_schemas"].items()}
    return spec.model_copy(update={"base": base, "output_dir": out, "fixed": fixed})


# -- cells -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One experiment of the sweep: its parameters (for the table) and the overrides that make it."""

    id: str
    kind: Literal["federated", "centralised"]
    seed: int
    params: dict[str, Any]
    overrides: dict[str, Any]


def value_overrides(key: str, value: Any) -> tuple[Any, dict[str, Any]]:
    """(value shown in the table, dotted overrides) for one grid value."""
    if isinstance(value, dict):
        overrides = {k: v for k, v in value.items() if k != "label"}
        label = value.get("label") or ",".join(f"{k}={v}" for k, v in overrides.items())
        return label, overrides
    if key == EPSILON_KEY and value in NONE_VALUES:
        return "none", {"privacy.mode": "none", EPSILON_KEY: None}
    if key == EPSILON_KEY:
        return float(value), {"privacy.mode": "sample_dp", EPSILON_KEY: float(value)}
    return value, {key: value}


def _slug(params: dict[str, Any], seed: int) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in params.items()] + [f"seed={seed}"]
    text = "_".join(parts)
    text = re.sub(r"[^A-Za-z0-9=.,_+]+", "-", text)
    if len(text) > 80:
        text = text[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Every combination of grid values × seeds, then the baselines; in a stable order."""
    keys = list(spec.grid)
    cells: list[Cell] = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        params: dict[str, Any] = {}
        overrides: dict[str, Any] = dict(spec.fixed)
        for key, value in zip(keys, combo, strict=True):
            shown, extra = value_overrides(key, value)
            params[key] = shown
            overrides |= extra
        for seed in spec.seeds:
            cells.append(
                Cell(
                    id=_slug(params, seed),
                    kind="federated",
                    seed=seed,
                    params=params,
                    overrides=overrides | {"seed": seed},
                )
            )
    for seed in spec.seeds:
        if CENTRALISED in spec.baselines:
            cells.append(
                Cell(
                    id=f"centralised_seed={seed}",
                    kind="centralised",
                    seed=seed,
                    params={},
                    overrides=dict(spec.fixed) | {"seed": seed, "privacy.mode": "none", EPSILON_KEY: None},
                )
            )
    ids = [c.id for c in cells]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ConfigError(f"sweep {spec.name}: two cells would share the folder {sorted(dup)[0]}; give labels")
    return cells


def cell_config(spec: SweepSpec, base: ExperimentConfig, cell: Cell, *, sweep_dir: Path) -> ExperimentConfig:
    """The cell's config: base + overrides; a distinct name (the engine tells cells apart by it)."""
    cfg = base.with_overrides(cell.overrides, source=f"sweep {spec.name}, cell {cell.id}")
    return cfg.model_copy(update={"name": f"{spec.name}--{cell.id}", "output_dir": sweep_dir / "runs"})


def materialise(cfg: ExperimentConfig, *, sweep_dir: Path, made: dict[str, Path]) -> ExperimentConfig:
    """Region files for a `split:` config, made once per distinct split and shared by the cells."""
    from fedcrm.experiment import materialise_regions

    if cfg.split is None:
        return materialise_regions(cfg, data_dir=sweep_dir / "data")
    key = hashlib.sha256(
        json.dumps([cfg.split.model_dump(mode="json"), str(cfg.schema_path)], sort_keys=True).encode()
    ).hexdigest()[:12]
    data_dir = sweep_dir / "data" / key
    if key in made:
        return cfg.model_copy(update={"regions": {r: (data_dir / f"{r}.csv").resolve() for r in cfg.split.regions}})
    made[key] = data_dir
    return materialise_regions(cfg, data_dir=data_dir)


def is_complete(run_dir: Path, cfg: ExperimentConfig) -> bool:
    from fedcrm.run_summary import RunSummary

    if not RunSummary.exists_in(run_dir):
        return False
    try:
        return RunSummary.read(run_dir).config_sha256 == cfg.digest()
    except StorageError:  # a damaged summary: the cell runs again
        return False


# -- results -----------------------------------------------------------------------------------------


@dataclass
class CellOutcome:
    cell: Cell
    cfg: ExperimentConfig | None
    run_dir: Path
    status: str  # done | failed | pending | skipped (complete before this invocation)
    error: str = ""
    summary: RunSummary | None = None  # done or skipped: the run's summary


def result_row(o: CellOutcome) -> dict[str, Any]:
    """One tidy row: parameters, final metrics, ε per region, wall time, status."""
    row: dict[str, Any] = {"cell": o.cell.id, "kind": o.cell.kind, "seed": o.cell.seed}
    row |= {k: v for k, v in o.cell.params.items()}
    cfg = o.cfg
    row["privacy_mode"] = cfg.privacy.mode if cfg else None
    row["target_epsilon"] = cfg.privacy.target_epsilon if cfg and cfg.privacy.mode == "sample_dp" else None
    row["status"] = "done" if o.status in ("done", "skipped") else o.status
    row["error"] = o.error
    s = o.summary
    for m in ("auc", "log_loss", "accuracy", "brier", "customers"):
        row[m] = s.final_metrics.get(m, math.nan) if s else math.nan
    eps = {r: p.get("epsilon") for r, p in s.privacy.items()} if s else {}
    for r, e in eps.items():
        row[f"epsilon_{r}"] = math.nan if e is None else float(e)
    known = [float(e) for e in eps.values() if e is not None]
    row["epsilon_max"] = max(known) if known else math.nan
    row["wall_time_s"] = s.wall_time_s if s else math.nan
    row["run_dir"] = str(o.run_dir)
    row["config_sha256"] = s.config_sha256 if s else (cfg.digest() if cfg else "")
    return row


def write_results(outcomes: list[CellOutcome], sweep_dir: Path) -> pd.DataFrame:
    df = pd.DataFrame([result_row(o) for o in outcomes])
    # Mixed columns (ε values and the label `none`) go to Parquet as text.
    for col in df.columns:
        if df[col].dtype == object and df[col].map(lambda v: isinstance(v, float | int) and v is not None).any():
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    tmp = sweep_dir / "results.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(sweep_dir / "results.csv")
    df.to_parquet(sweep_dir / "results.parquet.tmp", index=False)
    (sweep_dir / "results.parquet.tmp").replace(sweep_dir / "results.parquet")
    return df


# -- running -----------------------------------------------------------------------------------------


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run_sweep(
    spec: SweepSpec,
    *,
    out_dir: Path | None = None,
    engine: Literal["shared", "per_cell"] | None = None,
    report: Report = print,
    progress: Callable[[int, int], None] | None = None,
    ray_address: str | None = None,
) -> pd.DataFrame:
    """Run every incomplete cell; write the results table after each cell; return it.

    ``ray_address``: the federated cells run on that running Ray cluster (``fedcrm sweep --ray-address``).

    ``progress(done, to_run)`` is called before the first cell and after each one (a progress bar's hook).
    """
    from fedcrm.baseline import run_centralised

    sweep_dir = (out_dir or spec.output_dir / spec.name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    engine = engine or spec.engine
    base = load_config(spec.base)
    cells = expand_cells(spec)
    made: dict[str, Path] = {}
    outcomes: list[CellOutcome] = []
    todo: list[CellOutcome] = []
    for cell in cells:
        run_dir = sweep_dir / "runs" / cell.id
        try:
            cfg = materialise(cell_config(spec, base, cell, sweep_dir=sweep_dir), sweep_dir=sweep_dir, made=made)
        except FedcrmError as e:
            outcomes.append(CellOutcome(cell, None, run_dir, "failed", _describe_error(e)))
            continue
        o = CellOutcome(cell, cfg, run_dir, "pending")
        if is_complete(run_dir, cfg):
            o.status, o.summary = "skipped", RunSummary.read(run_dir)
        else:
            todo.append(o)
        outcomes.append(o)
    skipped = sum(o.status == "skipped" for o in outcomes)
    report(
        f"sweep {spec.name}: {len(cells)} cells, {skipped} already complete, {len(todo)} to run "
        f"(engine: {engine}) -> {sweep_dir}"
    )
    timings: dict[str, Any] = {"engine": engine, "engines_started": 0, "cells_run": 0}
    t0 = time.time()
    if progress is not None:
        progress(0, len(todo))

    def done(o: CellOutcome, result: RunSummary | BaseException) -> None:
        if isinstance(result, BaseException):
            o.status, o.error = "failed", _describe_error(result)
            report(f"[{o.cell.id}] failed: {o.error}")
        else:
            o.status, o.summary = "done", result
            _track(o, report)
            report(f"[{o.cell.id}] AUC {result.final_metrics.get('auc', math.nan):.4f} ({result.wall_time_s:.1f}s)")
        timings["cells_run"] += 1
        write_results(outcomes, sweep_dir)
        if progress is not None:
            progress(timings["cells_run"], len(todo))

    # A fresh start for every incomplete cell: the ledger of an interrupted attempt belongs to no result,
    # and keeping it would charge that attempt's spend to the new one.
    for o in todo:
        shutil.rmtree(o.run_dir, ignore_errors=True)
        shutil.rmtree(sweep_dir / "state" / o.cell.id, ignore_errors=True)

    for o in [o for o in todo if o.cell.kind == CENTRALISED]:
        assert o.cfg is not None
        try:
            done(o, run_centralised(o.cfg, run_dir=o.run_dir, state_root=sweep_dir / "state" / o.cell.id))
        except Exception as e:
            traceback.print_exc()
            done(o, e)

    federated = [o for o in todo if o.cell.kind == "federated"]
    t_fed = time.time()
    if engine == "per_cell":
        from fedcrm.fl.simulation import run_simulated

        for o in federated:
            assert o.cfg is not None
            timings["engines_started"] += 1
            try:
                result: RunSummary | BaseException = run_simulated(
                    o.cfg,
                    run_dir=o.run_dir,
                    state_root=sweep_dir / "state" / o.cell.id,
                    report=lambda s: None,
                    ray_address=ray_address,
                )
            except Exception as e:
                result = e
            done(o, result)
    else:
        from fedcrm.fl.multirun import SimulatedRun, run_many_simulated

        groups: dict[int, list[CellOutcome]] = {}
        for o in federated:
            assert o.cfg is not None
            groups.setdefault(len(o.cfg.regions), []).append(o)
        for group in groups.values():
            by_name = {o.cfg.name: o for o in group if o.cfg is not None}
            runs = [
                SimulatedRun(cfg=o.cfg, run_dir=o.run_dir, state_root=sweep_dir / "state" / o.cell.id)
                for o in group
                if o.cfg is not None
            ]
            timings["engines_started"] += 1

            def on_done(
                r: SimulatedRun, result: RunSummary | BaseException, by_name: dict[str, CellOutcome] = by_name
            ) -> None:
                done(by_name[r.cfg.name], result)

            try:
                run_many_simulated(runs, report=lambda s: None, on_done=on_done, ray_address=ray_address)
            except Exception as e:
                for o in group:
                    if o.status == "pending":
                        done(o, e)
    timings["wall_time_s"] = round(time.time() - t0, 2)
    # Engine start-ups included: the number that tells shared and per-cell engines apart.
    timings["federated_cells_run"] = len(federated)
    timings["federated_wall_time_s"] = round(time.time() - t_fed, 2)
    timings["seconds_per_federated_cell"] = round((time.time() - t_fed) / len(federated), 2) if federated else None
    _write_sweep_json(spec, sweep_dir, outcomes, timings)
    return write_results(outcomes, sweep_dir)


def _track(o: CellOutcome, report: Report) -> None:
    """Report, model card and MLflow logging for a finished cell whose config asks for tracking."""
    if o.cfg is None or o.cfg.tracking.kind == "none":
        return
    from fedcrm.report import write_run_report
    from fedcrm.tracking import log_run

    try:
        write_run_report(o.run_dir)
        if o.summary is not None:
            log_run(o.cfg, o.run_dir, o.summary)
    except Exception as e:  # tracking is a convenience: the cell's result stands
        report(f"[{o.cell.id}] tracking failed: {_describe_error(e)}")


def _write_sweep_json(spec: SweepSpec, sweep_dir: Path, outcomes: list[CellOutcome], timings: dict[str, Any]) -> None:
    p = sweep_dir / "sweep.json"
    history = []
    if p.exists():
        try:
            history = json.loads(p.read_text(encoding="utf-8")).get("invocations", [])
        except (OSError, json.JSONDecodeError):
            history = []
    doc = {
        "spec": json.loads(spec.model_dump_json()),
        "cells": [
            {
                "id": o.cell.id,
                "kind": o.cell.kind,
                "seed": o.cell.seed,
                "params": o.cell.params,
                "status": o.status,
                "error": o.error,
            }
            for o in outcomes
        ],
        "invocations": [*history, timings],
    }
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(p)
