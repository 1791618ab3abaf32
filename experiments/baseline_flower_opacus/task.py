"""Model, data and train/test loops of the hand-written baseline, after Flower's Opacus example.

Deliberately the straightforward way: a ``DataLoader`` over a ``TensorDataset`` (per-sample indexing
and collation) and a ``PrivacyEngine`` with its default per-sample-gradient hooks. Only the data
preparation is borrowed from fedcrm (same schema encoding, same hold-out customers, same region
files), so that both sides train on exactly the same rows; it is cached per process like the
example's ``fds`` cache.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SETTINGS_ENV = "BASELINE_SETTINGS"


@dataclass(frozen=True)
class Settings:
    """What the run needs, given to every process through one environment variable (JSON)."""

    region_files: list[str]
    schema: str
    hidden: list[int]
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    target_epsilon: float
    delta: float
    clipping_norm: float
    holdout_fraction: float
    seed: int
    out_dir: str

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class Net(nn.Module):
    """The same architecture as fedcrm's model (logistic when ``hidden`` is empty, else an MLP)."""

    def __init__(self, n_features: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


_cache: dict[int, tuple[TensorDataset, TensorDataset]] = {}


def load_data(partition_id: int, settings: Settings) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of one region: its file, encoded; the hold-out chosen by customer id."""
    if partition_id not in _cache:
        from fedcrm.data.encode import FeatureEncoder
        from fedcrm.data.io import load_table
        from fedcrm.data.schema import load_schema
        from fedcrm.unlearning.shards import holdout_mask

        schema = load_schema(Path(settings.schema))
        table = load_table(Path(settings.region_files[partition_id]), schema)
        x = torch.from_numpy(FeatureEncoder(schema).encode(table))
        y = torch.from_numpy(np.asarray(table.labels, dtype=np.float32))
        # The baseline has no region state: its hold-out is keyed by the config's seed (fedcrm keys it by
        # each region's secret). Only the split's size matters to a timing comparison.
        held_out = holdout_mask(table.ids, fraction=settings.holdout_fraction, secret=f"baseline:{settings.seed}")
        test = torch.from_numpy(held_out)
        _cache[partition_id] = (TensorDataset(x[~test], y[~test]), TensorDataset(x[test], y[test]))
    return _cache[partition_id]


def get_weights(net: nn.Module) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k.removeprefix("_module."), v.detach().clone()) for k, v in net.state_dict().items())


def train(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int) -> float:
    criterion = nn.BCEWithLogitsLoss()
    net.train()
    losses = []
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad()
            loss = criterion(net(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def test(net: nn.Module, loader: DataLoader) -> tuple[float, float, float]:
    """(log-loss, accuracy, AUC) on the region's hold-out."""
    net.eval()
    scores, labels = [], []
    with torch.no_grad():
        for xb, yb in loader:
            scores.append(torch.sigmoid(net(xb)))
            labels.append(yb)
    p, y = torch.cat(scores).numpy().astype(np.float64), torch.cat(labels).numpy()
    eps = 1e-7
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    return loss, float(np.mean((p >= 0.5) == (y == 1))), float(roc_auc_score(y, p))
