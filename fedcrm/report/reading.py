"""A finished run as the report reads it: its config, summary and metrics rows, and its provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedcrm.run_summary import RunSummary
from fedcrm.runs import CONFIG_FILE, read_metrics


@dataclass
class RunView:
    path: Path
    config: dict[str, Any]
    summary: RunSummary
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: Path) -> RunView:
        summary = RunSummary.read(run_dir)
        # The config as written, not validated: a report shows what the run was given, old settings included.
        cfg_path = run_dir / CONFIG_FILE
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        return cls(path=run_dir, config=config or {}, summary=summary, rows=read_metrics(run_dir / "metrics.jsonl"))

    @property
    def is_centralised(self) -> bool:
        return self.summary.is_centralised


def sha256_of(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(view: RunView) -> dict[str, Any]:
    """Code version, data and schema file hashes, seeds: what it takes to repeat the run."""
    cfg = view.config
    files: dict[str, str | None] = {}
    for region, p in (cfg.get("regions") or {}).items():
        files[f"region {region}: {p}"] = sha256_of(Path(p))
    split = cfg.get("split") or {}
    if split.get("input"):
        files[f"split input: {split['input']}"] = sha256_of(Path(split["input"]))
    if cfg.get("schema"):
        files[f"schema: {cfg['schema']}"] = sha256_of(Path(cfg["schema"]))
    return {
        "code_version": view.summary.code_version,
        "config_sha256": view.summary.config_sha256,
        "run_id": view.summary.run_id,
        "seed": cfg.get("seed"),
        "split_seed": split.get("seed"),
        "files_sha256": files,
    }
