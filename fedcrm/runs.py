"""A run directory: everything an ML engineer reads after ``fedcrm run``.

::

    RUN_DIR/config.yaml           the resolved config (and its sha256 in summary.json)
    RUN_DIR/metrics.jsonl         one line per round: per-region and pooled metrics, ε per region
    RUN_DIR/checkpoints/          weights after every round (round-0003-shard-0.npz)
    RUN_DIR/model/                the served model: constituents, feature names, config, version
    RUN_DIR/summary.json          final metrics, privacy per region, refusals, warnings
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.config import ExperimentConfig, dump_yaml, load_saved_config
from fedcrm.durable import append_to, storage_error, write_atomically, write_text_atomically
from fedcrm.errors import StorageError
from fedcrm.run_summary import SUMMARY_FILE, RunSummary

Weights = dict[str, np.ndarray]
CONFIG_FILE = "config.yaml"
MODEL_META = Path("model") / "model.json"


def _resume_hint(path: Path) -> str:
    return f"go on with `fedcrm run CONFIG --resume {path}`"


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomically(path, text, what="write the run's record", then=_resume_hint(path.parent))


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_weights(path: Path, weights: Weights, *, then: str = "") -> None:
    write_atomically(path, lambda f: np.savez(f, **weights), what="save model weights", then=then)  # type: ignore[arg-type]


def load_weights(path: Path) -> Weights:
    if not path.exists():
        raise StorageError(f"{path}: model weights not found")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise StorageError(f"{path}: model weights are damaged ({e}); retrain or restore the file") from None


@dataclass(frozen=True)
class ModelMeta:
    """``RUN_DIR/model/model.json``: which constituents the served model averages, and how to build them."""

    version: int
    kind: str
    hidden: tuple[int, ...]
    shards: list[int]
    feature_names: list[str]
    config: dict[str, Any]  # the run's config as the model was trained with it
    raw: dict[str, Any]  # the whole file, for a writer that keeps what it does not change (exclusion)

    @staticmethod
    def exists_in(run_dir: Path) -> bool:
        return (Path(run_dir) / MODEL_META).is_file()

    @classmethod
    def read(cls, run_dir: Path) -> ModelMeta:
        path = Path(run_dir) / MODEL_META
        if not path.exists():
            raise StorageError(f"{path}: no served model here (is {run_dir} a finished run folder?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                version=int(raw.get("version", 1)),
                kind=str(raw["kind"]),
                hidden=tuple(int(h) for h in raw.get("hidden", ())),
                shards=[int(k) for k in raw["shards"]],
                feature_names=[str(n) for n in raw["feature_names"]],
                config=dict(raw.get("config", {})),
                raw=raw,
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{path}: damaged model description ({e}); retrain or restore the file") from None


@dataclass
class RunDir:
    path: Path
    config: ExperimentConfig
    started: float = field(default_factory=time.time)

    @classmethod
    def open(cls, path: Path, *, finished: bool = False, schema_required: bool = True) -> RunDir:
        """An existing run folder with its saved config; ``finished``: its summary and served model too.

        Every missing file is named at once. ``schema_required=False`` reads the config where the run's
        schema file is not at hand (a data owner's export reads only the run's shards and hold-out).
        """
        path = Path(path)
        needed = [CONFIG_FILE] + ([SUMMARY_FILE, str(MODEL_META)] if finished else [])
        missing = [name for name in needed if not (path / name).is_file()]
        if missing:
            raise StorageError(
                f"{path}: not a {'finished ' if finished else ''}run folder, missing {', '.join(missing)}; give "
                "the folder `fedcrm run` wrote" + (" (a run without a summary did not finish)" if finished else "")
            )
        return cls(path=path, config=load_saved_config(path / CONFIG_FILE, schema_required=schema_required))

    def summary(self) -> RunSummary:
        return RunSummary.read(self.path)

    def model_meta(self) -> ModelMeta:
        return ModelMeta.read(self.path)

    @classmethod
    def create(cls, path: Path, config: ExperimentConfig) -> RunDir:
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "checkpoints").mkdir(exist_ok=True)
            (path / "model").mkdir(exist_ok=True)
        except OSError as exc:
            raise storage_error(path, "create the run folder", exc) from None
        _atomic_write(path / CONFIG_FILE, dump_yaml(config))
        return cls(path=path, config=config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        path = self.path / "metrics.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                append_to(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(path, "append the round's metrics", exc, then=_resume_hint(self.path)) from None

    def checkpoint_path(self, *, round_: int, shard: int) -> Path:
        return self.path / "checkpoints" / f"round-{round_:04d}-shard-{shard}.npz"

    def save_checkpoint(self, *, round_: int, shard: int, weights: Weights) -> Path:
        p = self.checkpoint_path(round_=round_, shard=shard)
        save_weights(p, weights, then=_resume_hint(self.path))
        return p

    def run_id(self, *, resume: bool, new: str) -> str:
        """The run's id: kept across a resume (the ledger's events name it), else ``new``."""
        path = self.path / "run.json"
        if resume and path.exists():
            return str(json.loads(path.read_text())["run_id"])
        _atomic_write(path, json.dumps({"run_id": new}) + "\n")
        return new

    def save_model(self, *, constituents: dict[int, Weights], feature_names: list[str], version: int) -> None:
        model_dir = self.path / "model"
        for k, w in constituents.items():
            save_weights(model_dir / f"constituent-{k}.npz", w)
        _atomic_write(
            self.path / MODEL_META,
            json.dumps(
                {
                    "version": version,
                    "kind": self.config.model.kind,
                    "hidden": list(self.config.model.hidden),
                    "shards": sorted(constituents),
                    "feature_names": feature_names,
                    "served_as": "mean of the constituents' predicted probabilities",
                    "config": self.config.to_dict(),
                },
                indent=2,
            )
            + "\n",
        )

    def write_summary(self, summary: RunSummary) -> None:
        _atomic_write(RunSummary.path_in(self.path), summary.to_json())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``; a torn last line (crash mid-write) is reported, not dropped silently."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == "")
            kind = "torn last line (a crash during the write)" if last else "damaged line"
            raise StorageError(f"{path}:{i}: {kind}; keep a copy, then remove that line to go on") from None
    return rows


def completed_rounds(run_dir: Path) -> dict[int, int]:
    """Last round per shard whose metrics line *and* checkpoint are both on disk."""
    done: dict[int, int] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        shard, rnd = int(row["shard"]), int(row["round"])
        if (run_dir / "checkpoints" / f"round-{rnd:04d}-shard-{shard}.npz").exists():
            done[shard] = max(done.get(shard, 0), rnd)
    return done
