"""The customer models: logistic regression and a small MLP, both emitting one logit per customer.

Only layers whose per-sample gradients Opacus computes exactly (``nn.Linear``) and no batch
statistics (no BatchNorm), so DP-SGD applies as is.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from fedcrm.config import ModelConfig


def build_model(spec: ModelConfig, *, n_features: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same ``seed`` gives the same weights on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.kind == "logistic":
            return nn.Sequential(OrderedDict(out=nn.Linear(n_features, 1)))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = n_features
        for i, h in enumerate(spec.hidden):
            layers[f"hidden{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = nn.ReLU()
            width = h
        layers["out"] = nn.Linear(width, 1)
        return nn.Sequential(layers)


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in _plain(model).state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    target = _plain(model)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        raise ValueError(f"model weights do not fit: expected {expected}, found {found}")
    target.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()})


def _plain(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus wrapper (whose state_dict keys carry a ``_module.`` prefix)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


# Rows scored at once: the activations' memory is then bounded by the model (its size a policy bounds,
# fedcrm.model_limits), not by how many customers a region holds, so running out of memory cannot tell
# the server a hold-out's size.
PREDICT_CHUNK_ROWS = 8192


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    plain = _plain(model)
    xt = torch.from_numpy(x)
    out = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), PREDICT_CHUNK_ROWS):
        chunk = xt[start : start + PREDICT_CHUNK_ROWS]
        out[start : start + len(chunk)] = torch.sigmoid(plain(chunk).squeeze(-1)).numpy()
    return out


def ensemble_proba(models: list[nn.Module], x: np.ndarray) -> np.ndarray:
    """The served model of a sharded run: the mean of its constituents' probabilities."""
    return np.mean([predict_proba(m, x) for m in models], axis=0)
