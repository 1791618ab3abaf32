"""Local training at one region: plain SGD, or DP-SGD with Opacus.

Batches come from pre-encoded tensors by Poisson sampling (each customer joins each step
independently with probability q), which is the sampling that the privacy accounting assumes.
Per-sample gradients use Opacus's ghost clipping, the fastest exact path for these models
(see ``experiments/bench_local_training.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcrm.config import TrainingConfig


@dataclass(frozen=True)
class DpSgd:
    """The DP-SGD mechanism's settings: Gaussian noise of ``noise_multiplier × clipping_norm``."""

    noise_multiplier: float
    clipping_norm: float


@dataclass(frozen=True)
class TrainResult:
    examples: int
    sample_rate: float
    steps: int
    empty_batches: int
    mean_loss: float


def sampling_plan(*, n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson sampling rate and number of steps for ``epochs`` passes over ``n`` customers."""
    if n <= 0:
        raise ValueError("no customers to train on")
    q = min(1.0, batch_size / n)
    return q, epochs * math.ceil(n / batch_size)


def train_locally(
    model: nn.Module,
    *,
    x: np.ndarray,
    y: np.ndarray,
    training: TrainingConfig,
    dp: DpSgd | None,
    seed: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for ``training.local_epochs`` epochs."""
    n = len(x)
    q, steps = sampling_plan(n=n, batch_size=training.batch_size, epochs=training.local_epochs)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.float32))
    sampler = torch.Generator().manual_seed(seed)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt_cls = torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD
    optimizer: torch.optim.Optimizer = opt_cls(model.parameters(), lr=training.learning_rate)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    trainable = model
    if dp is not None:
        trainable, optimizer, criterion = _make_private(
            model, optimizer=optimizer, criterion=criterion, x=xt, y=yt, dp=dp,
            batch_size=training.batch_size, seed=seed,
        )
    trainable.train()
    losses: list[float] = []
    empty = 0
    for _ in range(steps):
        mask = torch.rand(n, generator=sampler) < q
        if not bool(mask.any()):
            # An empty Poisson batch releases nothing; the ledger still charges the step (conservative).
            empty += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(trainable(xt[mask]).squeeze(-1), yt[mask])
        loss.backward()
        optimizer.step()
        if proximal_mu > 0:
            # FedProx's pull towards the global model, as a step after the (noisy) update:
            # it touches no data, so under DP it is post-processing.
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_params, strict=True):
                    p.sub_(training.learning_rate * proximal_mu * (p - g))
        losses.append(float(loss.detach()))
    return TrainResult(
        examples=n, sample_rate=q, steps=steps, empty_batches=empty,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
    )


def _make_private(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dp: DpSgd,
    batch_size: int,
    seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    from opacus import PrivacyEngine

    # The loader only tells Opacus the expected batch size; batches are drawn from tensors above.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*full backward hook.*")
        private_model, private_opt, private_criterion, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clipping_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    private_opt.expected_batch_size = batch_size
    return private_model, private_opt, private_criterion
