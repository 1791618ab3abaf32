"""Hostile or broken updates, injected by test-only client mods into a real simulation, are rejected.

Five regions: one replays an earlier update, one sends a change 50 times larger than it trained, one
sends NaN, two are honest. Each bad update is rejected with its reason, recorded per round in
metrics.jsonl and in the summary, and the model trains on the honest ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import write_tiny_config
from flwr.app import Array, ArrayRecord, Context, Message
from sklearn.metrics import roc_auc_score

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.served import ServedModel
from fedcrm.fl.simulation import run_simulated
from fedcrm.node_settings import region_settings
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, MECHANISM_GAUSSIAN, PrivacyLedger
from fedcrm.region import Region
from fedcrm.runs import load_weights, read_metrics

Mod = Callable[[Message, Context, Callable[..., Message]], Message]


def tamper(region: str, change: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Mod:
    """A client mod that rewrites ``region``'s trained weights: change(sent, trained) -> sent instead."""

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        reply = call_next(msg, context)
        if (
            context.node_config.get("region") != region
            or msg.metadata.message_type != "train"
            or wire.ARRAYS not in reply.content
        ):
            return reply
        sent = {k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()}
        trained = {k: v.numpy() for k, v in reply.content[wire.ARRAYS].items()}
        reply.content[wire.ARRAYS] = ArrayRecord.from_array_dict(
            {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in change(sent, trained).items()}
        )
        return reply

    return mod


def replay_first(store: Path) -> Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Send the first trained update again in every later round (kept on disk: clients are processes)."""

    def change(sent: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not store.exists():
            np.savez(store, **trained)  # type: ignore[arg-type]
        with np.load(store) as first:
            return {k: first[k] for k in first.files}

    return change


def test_replayed_oversized_and_nan_updates_are_rejected_with_reasons(tmp_path: Path) -> None:
    regions = {f"r{i}": 400 for i in range(5)}
    # ε = 8: fresh noise every run, and the honest regions' model must be clearly better than chance in
    # every run, not only in most (at ε = 2 its hold-out AUC ranged 0.55-0.68 over runs).
    cfg = load_config(
        write_tiny_config(
            tmp_path,
            regions=regions,
            overrides={"training.rounds": 3, "federation.min_regions": 2, "privacy.target_epsilon": 8.0},
        )
    )
    mods = [
        tamper("r0", replay_first(tmp_path / "r0-first-update.npz")),
        tamper("r1", lambda sent, trained: {k: sent[k] + 50 * (trained[k] - sent[k]) for k in sent}),
        tamper("r2", lambda sent, trained: {k: np.full_like(v, np.nan) for k, v in trained.items()}),
    ]
    summary = run_simulated(
        cfg, run_dir=tmp_path / "run", state_root=tmp_path / "state", report=lambda s: None, client_mods=mods
    )

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "r0" not in rows[0]["rejected"]  # its first update is genuine
    for row in rows[1:]:
        assert row["rejected"]["r0"].startswith(
            "replayed update: bit-for-bit equal to the update region r0 sent in round 1"
        )
    for row in rows:
        assert "x the round's median" in row["rejected"]["r1"]
        assert "NaN" in row["rejected"]["r2"]
        assert set(row["epsilon"]) == {"r3", "r4"} | ({"r0"} if row["round"] == 1 else set())
    assert set(summary.events["rejected"]) == {"r0", "r1", "r2"}
    # Rejected or not, every region trained and released each round: all of it is charged.
    for region in regions:
        ledger = PrivacyLedger.open(tmp_path / "state" / region, region=region)
        events = ledger.events()
        assert [e.round for e in events if e.mechanism == MECHANISM_DP_SGD] == [1, 2, 3]
        # The rest are the final evaluation's DP answers, charged to the hold-out, not to training.
        assert {(e.mechanism, e.round, e.population) for e in events if e.mechanism != MECHANISM_DP_SGD} == {
            (MECHANISM_GAUSSIAN, 0, "holdout:200000/1000000")
        }
    # Nothing of the NaN or the 50x update reached the model: it is finite and better than chance, measured
    # exactly on every customer of the five regions (2,000: the hold-out alone, 400, adds sampling noise to
    # a weak 3-round model). The summary's figures are DP answers: on 400 hold-out customers their noise
    # is of the order of the AUC itself (docs/results.md), so only their form is checked.
    weights = load_weights(tmp_path / "run" / "model" / "constituent-0.npz")
    assert all(np.all(np.isfinite(v)) for v in weights.values())
    schema, served = load_schema(cfg.schema_path), ServedModel.load(tmp_path / "run")
    scores, labels = [], []
    for region in regions:
        data = Region(region_settings(cfg, state_root=tmp_path / "state")[region]).load(cfg, schema)
        scores.append(served.proba(data.x))
        labels.append(data.y)
    assert roc_auc_score(np.concatenate(labels), np.concatenate(scores)) > 0.55
    assert 0 <= summary.final_metrics["auc"] <= 1 and np.isfinite(summary.final_metrics["log_loss"])
