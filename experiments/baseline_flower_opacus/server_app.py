"""Baseline ServerApp (Message API): FedAvg weighted by examples, one metrics line per round."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from baseline_flower_opacus.task import Net, Settings, get_weights

app = ServerApp()


class LoggedFedAvg(FedAvg):
    """FedAvg that appends each round's evaluation (and the time since start) to metrics.jsonl."""

    def __init__(self, *, log_path: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.log_path = log_path
        self.t0 = time.time()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        agg = super().aggregate_evaluate(server_round, replies)
        now = time.time()
        row = {"round": server_round, "time_s": round(now - self.t0, 3), "t": now, "pooled": dict(agg or {})}
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return agg


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_env()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(settings.region_files)
    strategy = LoggedFedAvg(
        log_path=out / "metrics.jsonl", min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n
    )
    from baseline_flower_opacus.task import load_data

    n_features = load_data(0, settings)[0].tensors[0].shape[1]
    torch.manual_seed(settings.seed)
    initial = Net(n_features, settings.hidden)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_weights(initial)), num_rounds=settings.rounds)
    (out / "final_metrics.json").write_text(json.dumps(dict(result.evaluate_metrics_clientapp), default=str))
