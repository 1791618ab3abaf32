"""The run folder's files read and written in one place: RunDir.open, RunSummary, ModelMeta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcrm.config import load_config
from fedcrm.errors import StorageError
from fedcrm.run_summary import RunSummary
from fedcrm.runs import ModelMeta, RunDir
from tests.conftest import write_tiny_config

# A summary as fedcrm 0.1 wrote it (fl/server.py at 9855b9f): no `started`, `audit_head`, trust sections.
OLD_SUMMARY = {
    "name": "tiny",
    "run_id": "tiny-1a2b3c4d",
    "task": "churn",
    "privacy_mode": "sample_dp",
    "final_metrics": {"auc": 0.71, "log_loss": 0.6, "accuracy": 0.7, "brier": 0.2, "customers": 120},
    "final_metrics_by_region": {"eu": {"auc": 0.7}},
    "suppressed_regions": {},
    "privacy": {
        "eu": {
            "epsilon": 1.5,
            "delta": 1e-5,
            "budget": 8.0,
            "accountant": "rdp",
            "target_epsilon": 2.0,
            "refused": None,
        }
    },
    "regions": {
        "eu": {"customers_in_table": 200, "excluded_no_consent": 10, "forgotten": 0, "train": 150, "holdout": 40}
    },
    "events": {"refused": {}, "failed": {}, "rejected": {}},
    "warnings": [],
    "shards": 1,
    "model_version": 1,
    "rounds_completed": 2,
    "config_sha256": "ab" * 32,
    "code_version": "9855b9f",
    "wall_time_s": 3.2,
}


def test_an_old_summary_loads_and_is_written_back_unchanged(tmp_path: Path) -> None:
    text = json.dumps(OLD_SUMMARY, indent=2) + "\n"
    (tmp_path / "summary.json").write_text(text)
    summary = RunSummary.read(tmp_path)
    assert summary.started is None and summary.audit_head is None and summary.fairness is None
    assert summary.epsilon_by_region() == {"eu": 1.5} and summary.delta() == 1e-5
    assert summary.to_json() == text  # no key added, none lost, same order


def test_unknown_keys_are_kept_and_a_summary_without_its_keys_is_refused(tmp_path: Path) -> None:
    summary = RunSummary.from_dict(OLD_SUMMARY | {"from_a_newer_fedcrm": [1]}, source="x")
    assert summary.to_dict()["from_a_newer_fedcrm"] == [1]
    broken = {k: v for k, v in OLD_SUMMARY.items() if k not in ("privacy", "wall_time_s")}
    with pytest.raises(StorageError, match="x: not a run summary, missing key.s. privacy, wall_time_s"):
        RunSummary.from_dict(broken, source="x")
    (tmp_path / "summary.json").write_text('{"name": ')
    with pytest.raises(StorageError, match="damaged run summary"):
        RunSummary.read(tmp_path)


def test_problems_gather_every_event_and_refusal() -> None:
    raw = OLD_SUMMARY | {
        "events": {"failed": {"node-3": "no reply"}},
        "privacy": {"eu": {**OLD_SUMMARY["privacy"]["eu"], "refused": "budget"}},
    }  # type: ignore[dict-item]
    summary = RunSummary.from_dict(raw, source="x")
    assert summary.problems() == {"node-3": "no reply", "eu": "budget"}
    assert summary.event_reasons() == {"refused": {}, "failed": {"node-3": "no reply"}, "rejected": {}}


def test_open_names_every_missing_file_then_reads_config_summary_and_model(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path))
    run = tmp_path / "run"
    with pytest.raises(StorageError, match="missing config.yaml"):
        RunDir.open(run)
    RunDir.create(run, cfg)
    assert RunDir.open(run).config.digest() == cfg.digest()
    with pytest.raises(StorageError, match=r"not a finished run folder, missing summary.json, model/model.json"):
        RunDir.open(run, finished=True)
    RunDir(path=run, config=cfg).write_summary(RunSummary.from_dict(OLD_SUMMARY, source="x"))
    RunDir(path=run, config=cfg).save_model(constituents={}, feature_names=["a", "b"], version=4)
    opened = RunDir.open(run, finished=True)
    assert opened.summary().run_id == "tiny-1a2b3c4d"
    meta = opened.model_meta()
    assert (meta.version, meta.feature_names, meta.kind) == (4, ["a", "b"], cfg.model.kind)
    (run / "model" / "model.json").write_text("{}")
    with pytest.raises(StorageError, match="damaged model description"):
        ModelMeta.read(run)
