"""Local training at one region: plain SGD, or DP-SGD with Opacus.

Batches come from pre-encoded tensors by Poisson sampling (each customer joins each step
independently with probability q), which is the sampling that the privacy accounting assumes.
Per-sample clipping for fedcrm's models (Linear stacks) takes one backward pass
(:mod:`fedcrm.privacy.clipping`, same results as Opacus's ghost clipping); any other model goes through
Opacus's ghost clipping. Measured in ``experiments/bench_local_training.py``.

The mechanism is total for any weights the server sends: a customer whose loss, activations or gradient
are not finite contributes nothing to a step, and a non-finite noisy result becomes a noise-only step, so
what leaves is the mechanism's output whatever the data (fedcrm.privacy.clipping).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcrm.config import TrainingConfig
from fedcrm.privacy.clipping import LinearStackDpSgd, supports
from fedcrm.privacy.randomness import ReleaseRandomness


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


def _optimizer(
    cls: type[torch.optim.Adam] | type[torch.optim.SGD], model: nn.Module, *, lr: float
) -> torch.optim.Optimizer:
    """The fused (one kernel for all parameters) variant where torch has it: it was a third of a step."""
    try:
        return cls(model.parameters(), lr=lr, fused=True)  # type: ignore[call-arg]
    except (RuntimeError, TypeError):
        return cls(model.parameters(), lr=lr)


def train_locally(
    model: nn.Module,
    *,
    x: np.ndarray,
    y: np.ndarray,
    training: TrainingConfig,
    dp: DpSgd | None,
    randomness: ReleaseRandomness,
    proximal_mu: float = 0.0,
    planned_customers: int | None = None,
    canaries: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``training.local_epochs`` epochs.

    ``randomness`` draws every Poisson sample and all the noise: for a DP release it must be the
    region's own (:mod:`fedcrm.privacy.randomness`). ``planned_customers`` is the public size the
    sampling rate and the number of steps were planned from (the region's declared size), when it
    differs from the true number of rows.

    ``canaries`` is the white-box privacy audit's hook (fedcrm.evaluation.white_box_audit), never set in
    training: rows of per-sample gradients (one per canary, over the flattened parameters) that are
    Poisson-sampled at the customers' rate, as further rows after the customers, and clipped and
    noised with them.
    """
    n = len(x)
    q, steps = sampling_plan(n=planned_customers or n, batch_size=training.batch_size, epochs=training.local_epochs)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.float32))
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt_cls = torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD
    optimizer: torch.optim.Optimizer = _optimizer(opt_cls, model, lr=training.learning_rate)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    trainable = model
    fast: LinearStackDpSgd | None = None
    if dp is not None and supports(model):
        # Exact per-sample clipping in one backward pass, same results as Opacus's ghost clipping
        # (fedcrm/privacy/clipping.py); Opacus's general path below serves any other model.
        fast = LinearStackDpSgd(
            model,  # type: ignore[arg-type]
            noise_multiplier=dp.noise_multiplier,
            clipping_norm=dp.clipping_norm,
            expected_batch_size=training.batch_size,
            randomness=randomness,
        )
    elif dp is not None:
        trainable, optimizer, criterion = _make_private(
            model,
            optimizer=optimizer,
            criterion=criterion,
            x=xt,
            y=yt,
            dp=dp,
            batch_size=training.batch_size,
            randomness=randomness,
        )
    if canaries is not None and fast is None:
        raise ValueError("gradient canaries need DP-SGD on a Linear stack (fedcrm.privacy.clipping)")
    trainable.train()
    losses: list[float] = []
    empty = 0
    rows = n if canaries is None else n + canaries.shape[0]
    for _ in range(steps):
        idx = randomness.poisson_sample(rows, q=q)
        extra = None
        if canaries is not None:
            extra, idx = canaries.index_select(0, idx[idx >= n] - n), idx[idx < n]
        if len(idx) == 0:
            empty += 1
            if dp is None:
                continue
            # An empty Poisson batch still takes a noisy step: the accountant charges a noisy step, and
            # skipping it would tell whoever sees the update that this step's sample was empty.
            if fast is not None:
                fast.noise_only_step(extra=extra)
            else:
                optimizer.zero_grad(set_to_none=True)
                for p in trainable.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            optimizer.step()
            continue
        xb, yb = xt.index_select(0, idx), yt.index_select(0, idx)
        if fast is not None:
            loss = fast.compute_grads(xb, yb, extra=extra)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(trainable(xb).squeeze(-1), yb)
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
        examples=n,
        sample_rate=q,
        steps=steps,
        empty_batches=empty,
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
    randomness: ReleaseRandomness,
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
        )
    private_opt.expected_batch_size = batch_size
    _draw_noise_from(randomness, optimizer=private_opt)
    return private_model, private_opt, private_criterion


def _draw_noise_from(randomness: ReleaseRandomness, *, optimizer: torch.optim.Optimizer) -> None:
    """Make Opacus's optimizer draw its noise from the region's randomness, not a torch generator.

    Opacus's own source is a ``torch.Generator`` (32-bit seeds on CPU) or, in secure mode, the
    deprecated torchcsprng; its clipping and scaling stay as they are.
    """
    std = optimizer.noise_multiplier * optimizer.max_grad_norm  # type: ignore[attr-defined]

    def add_noise() -> None:
        params = optimizer.params  # type: ignore[attr-defined]
        sums = [p.summed_grad for p in params]
        if not all(bool(torch.isfinite(s).all()) for s in sums):
            # Opacus's ghost clipping cannot drop one non-finite row (its second backward pass multiplies
            # the row by 0 and gets nan), so a non-finite sum becomes a noise-only step: the noise is still
            # added and nothing non-finite leaves, but the other rows' share is lost with it, which bounds
            # no one's influence. A region never takes this path: every model fedcrm.models builds takes
            # the exact one (fedcrm.privacy.clipping), which drops the non-finite row alone.
            sums = [torch.zeros_like(s) for s in sums]
        for p, summed in zip(params, sums, strict=True):
            p.grad = (summed + randomness.normal(summed.shape, std=std, dtype=summed.dtype)).view_as(p)

    optimizer.add_noise = add_noise  # type: ignore[attr-defined]
