"""Shared fixtures: tiny synthetic federations written to real files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The public tables live outside the repository; FEDCRM_SHARED_DATA points elsewhere (a worktree).
SHARED_DATA = Path(os.environ.get("FEDCRM_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def write_tiny_config(
    tmp_path: Path, *, regions: dict[str, int] | None = None, overrides: dict | None = None, seed: int = 0
) -> Path:
    """Synthetic regions (`fedcrm data synth`) and an experiment config pointing at them."""
    from fedcrm.data.synthetic import generate

    regions = regions or {"eu": 700, "us": 500}
    data_dir = tmp_path / "data"
    generate(regions=list(regions), customers=list(regions.values()), seed=seed, out_dir=data_dir)
    cfg = {
        "name": "tiny",
        "task": "churn",
        "schema": str(REPO / "configs" / "schemas" / "synthetic_crm.yaml"),
        "regions": {r: str(data_dir / f"{r}.csv") for r in regions},
        "model": {"kind": "logistic"},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 64, "optimizer": "adam", "learning_rate": 0.05},
        "privacy": {"mode": "sample_dp", "target_epsilon": 2.0, "clipping_norm": 1.0},
        "federation": {"min_regions": 1},
        "evaluation": {"holdout_fraction": 0.2},
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def plan_message(cfg, *, message_type: str = "query", run_id: str = "r"):  # noqa: ANN001, ANN201
    """A well-formed server message carrying ``cfg``'s plan: every region checks one before its handler runs.

    Needs Flower's task identity (the ``task_identity`` fixture) to build the message.
    """
    from flwr.app import Message, RecordDict

    from fedcrm import wire
    from fedcrm.fl.codec import plan_config

    plan = plan_config(cfg, schema_text=Path(cfg.schema_path).read_text(encoding="utf-8"), run_id=run_id)
    return Message(content=RecordDict({wire.CONFIG: plan}), dst_node_id=1, message_type=message_type)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the process's task identity (set by the SuperLink/SuperNode)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models train faster on one thread, and much faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def requires_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"the public CRM tables are not at {SHARED_DATA}")


def exact_holdout_metrics(cfg, *, run_dir: Path, state: Path) -> dict[str, float]:  # noqa: ANN001
    """The served model's AUC and log-loss on the pooled hold-outs, computed at the regions without noise.

    The summary's metrics are DP answers (noisy by design, very noisy on small test hold-outs): tests that
    judge the model's quality read it here, against scikit-learn.
    """
    import numpy as np
    from sklearn.metrics import log_loss, roc_auc_score

    from fedcrm.data.schema import load_schema
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.region import NodeSettings, Region

    served, schema = ServedModel.load(run_dir), load_schema(cfg.schema_path)
    scores, labels = [], []
    for region, path in cfg.regions.items():
        data = Region(
            NodeSettings(
                region=region,
                data_path=Path(path),
                state_dir=state / region,
                policy_path=cfg.policies.get(region),
                schema_path=cfg.schema_path,
            )
        ).load(cfg, schema)
        scores.append(served.proba(data.x[data.holdout]))
        labels.append(data.y[data.holdout])
    y, p = np.concatenate(labels), np.clip(np.concatenate(scores), 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(y, p)), "log_loss": float(log_loss(y, p))}


PERMISSIVE_POLICY = REPO / "configs" / "policies" / "permissive.yaml"


def same_region_state(template: Path, state_root: Path, regions) -> Path:  # noqa: ANN001
    """``state_root`` starts as a copy of ``template``'s region folders (made once: each region's secret
    and an empty ledger), so runs compared with each other hold out the same customers and, in
    reproducible noise mode, draw the same release keys. Returns ``state_root``."""
    import shutil

    from fedcrm.privacy.ledger import PrivacyLedger
    from fedcrm.state.secret import region_secret

    for region in regions:
        if not (template / region).exists():
            region_secret(template / region)
            PrivacyLedger.open(template / region, region=region)
        shutil.copytree(template / region, state_root / region)
    return state_root


def one_region(tmp_path: Path, *, customers: int, overrides: dict | None = None, policy: dict | None = None):  # noqa: ANN201
    """A tiny one-region config and the node settings of its region ``eu`` (with ``policy`` as its file)."""
    from fedcrm.config import load_config
    from fedcrm.region import NodeSettings

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": customers}, overrides=overrides))
    policy_path = None
    if policy is not None:
        policy_path = tmp_path / "eu-policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy))
    return cfg, NodeSettings(
        region="eu",
        data_path=Path(cfg.regions["eu"]),
        state_dir=tmp_path / "state" / "eu",
        policy_path=policy_path,
        schema_path=cfg.schema_path,  # the data owner's own copy of the schema
    )


def write_layout_1_ledger(state_dir: Path, events: list[tuple]) -> Path:  # type: ignore[type-arg]
    """A privacy ledger as fedcrm 0.1 wrote it (layout 1: no partition, no randomness column), every event
    sent. ``events``: rows of (id, region, shard, round, noise_multiplier, sample_rate, steps, delta)."""
    import sqlite3

    from fedcrm.privacy.ledger import LEDGER_FILENAME

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LEDGER_FILENAME
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, region TEXT NOT NULL,
            shard INTEGER NOT NULL CHECK (shard >= 0), purpose TEXT NOT NULL, run_id TEXT NOT NULL,
            round INTEGER NOT NULL CHECK (round >= 0), mechanism TEXT NOT NULL CHECK (mechanism = 'dp_sgd'),
            noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
            delta REAL NOT NULL, note TEXT NOT NULL);
        CREATE TABLE outcomes (event_id INTEGER PRIMARY KEY REFERENCES events (id), time TEXT NOT NULL,
            outcome TEXT NOT NULL, reason TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
    """)
    for event_id, region, shard, round_, sigma, q, steps, delta in events:
        conn.execute(
            "INSERT INTO events VALUES (?, 't', ?, ?, 'churn', 'old', ?, 'dp_sgd', ?, ?, ?, ?, '')",
            (event_id, region, shard, round_, sigma, q, steps, delta),
        )
        conn.execute("INSERT INTO outcomes VALUES (?, 't', 'sent', '')", (event_id,))
    conn.commit()
    conn.close()
    return path
