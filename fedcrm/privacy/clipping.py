"""Exact DP-SGD steps for stacks of ``nn.Linear`` layers, in one ordinary backward pass.

Why this exists: fedcrm's models are Linear layers with element-wise activations in between. For a
Linear layer, customer i's weight gradient is the outer product ``g_i a_iᵀ`` of the layer's output
gradient and its input, so its norm is ``‖g_i‖·‖a_i‖`` (the "ghost norm" Opacus's ghost clipping
uses) and the sum of clipped gradients is ``(c ⊙ g)ᵀ a``. One backward pass to the layers' outputs
gives every ``g``; no per-sample gradient is ever materialised and no second backward pass is needed.
Opacus's ghost clipping computes the same quantities but pays two backward passes, Python hooks on
every layer and a deep copy of every gradient each step: on these small tabular models that
overhead, not arithmetic, was most of the time (profile and figures in docs/benchmarks.md).

Same semantics as Opacus's ghost clipping with ``loss_reduction="mean"`` and Poisson sampling:
clip factor ``min(1, C / (‖∇ℓ_i‖ + 1e-6))``, Gaussian noise of std ``σ·C`` drawn per parameter in
``model.parameters()`` order from the release's randomness, then division by the *expected* batch
size. A test checks that both give the same weights for the same noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcrm.privacy.randomness import ReleaseRandomness

# Parameter-free layers that act on each customer's row alone (no batch statistics, no randomness).
PER_SAMPLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Identity,
)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a stack this module handles exactly (else use Opacus's general path)."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return False
    for layer in model:
        if isinstance(layer, nn.Linear):
            if not layer.weight.requires_grad or (layer.bias is not None and not layer.bias.requires_grad):
                return False
        elif not isinstance(layer, PER_SAMPLE_LAYERS):
            return False
    return isinstance(model[-1], nn.Linear) and model[-1].out_features == 1


class LinearStackDpSgd:
    """Clipped, noised gradients for a binary-logit ``nn.Sequential`` of Linear + activation layers."""

    def __init__(
        self,
        model: nn.Sequential,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        expected_batch_size: int,
        randomness: ReleaseRandomness,
    ) -> None:
        if not supports(model):
            raise ValueError("LinearStackDpSgd needs an nn.Sequential of Linear and per-sample activation layers")
        self.model = model
        self.noise_std = noise_multiplier * clipping_norm
        self.clipping_norm = clipping_norm
        self.expected_batch_size = expected_batch_size
        self.randomness = randomness
        self.linears = [m for m in model if isinstance(m, nn.Linear)]
        self.params = list(model.parameters())  # Opacus's order, so the same seed draws the same noise

    def compute_grads(self, x: torch.Tensor, y: torch.Tensor, *, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Set every parameter's ``.grad`` to the DP-SGD gradient of one Poisson batch; return the mean loss.

        ``extra``: further per-sample gradients that come from no customer row (see :meth:`_add_clipped`);
        only the privacy audit passes them, training never does.
        """
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        h = x
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                inputs.append(h.detach())
                h = layer(h)
                outputs.append(h)
            else:
                h = layer(h)
        per_sample = F.binary_cross_entropy_with_logits(h.squeeze(-1), y, reduction="none")
        # d(sum of losses)/d(outputs): row i is customer i's own output gradient (rows do not interact).
        out_grads = torch.autograd.grad(per_sample.sum(), outputs)
        with torch.no_grad():
            loss = per_sample.detach().mean()
            sq_norms = self._sq_norms(inputs, out_grads)
            # One look for the whole batch (a sum is finite only if every term is): the rows' own checks
            # below cost a fifth of a step, and only weights that make some row non-finite need them.
            if math.isfinite(float(sq_norms.sum() + loss)):
                clip, dropped = (self.clipping_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0).unsqueeze(1), None
            else:
                clip, dropped = self._clip_finite_rows(inputs, out_grads, per_sample.detach())
            for layer, a, g in zip(self.linears, inputs, out_grads, strict=True):
                gc = g * clip
                if dropped is not None:  # 0 · inf is nan: the dropped rows themselves must be zeros
                    gc, a = gc.masked_fill(dropped, 0.0), a.masked_fill(dropped, 0.0)
                layer.weight.grad = gc.t() @ a
                if layer.bias is not None:
                    layer.bias.grad = gc.sum(0)
            if extra is not None:
                self._add_clipped(extra)
            # Every row is now finite and clipped, so each entry of their sum is at most the batch size
            # times C: only the dropped rows' path or the audit's rows are worth checking again.
            self._noise_and_scale(check=dropped is not None or extra is not None)
        return loss

    def _sq_norms(self, inputs: list[torch.Tensor], out_grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Each row's squared gradient norm over every Linear layer, ‖g_i‖²·(‖a_i‖² + 1 with a bias), in their dtype."""
        sq_norms = torch.zeros(len(inputs[0]), dtype=inputs[0].dtype)
        for layer, a, g in zip(self.linears, inputs, out_grads, strict=True):
            a_sq = (a * a).sum(1)
            sq_norms.addcmul_((g * g).sum(1), a_sq + 1.0 if layer.bias is not None else a_sq)
        return sq_norms

    def _clip_finite_rows(
        self, inputs: list[torch.Tensor], out_grads: tuple[torch.Tensor, ...], per_sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip factors of a batch with a non-finite row, and the rows to drop (a column mask).

        The mechanism is total for any weights: a row whose loss, activations or gradient are not finite
        (weights the server chose can make them so for exactly the customers it targets) contributes zero,
        as an absent customer does, instead of turning the whole release into NaN. Norms in float64 here:
        a finite float32 gradient's squared norm can overflow float32, and such a row is clipped, not dropped.
        """
        sq_norms = self._sq_norms([a.double() for a in inputs], tuple(g.double() for g in out_grads))
        finite = torch.isfinite(sq_norms) & torch.isfinite(per_sample)
        clip = torch.where(finite, (self.clipping_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0), 0.0)
        return clip.to(inputs[0].dtype).unsqueeze(1), ~finite.unsqueeze(1)

    def noise_only_step(self, *, extra: torch.Tensor | None = None) -> None:
        """The gradient of a Poisson batch with no customer: the noise (and any ``extra`` rows) alone.

        The step must not be skipped: the accountant charges a noisy step.
        """
        with torch.no_grad():
            for p in self.params:
                p.grad = torch.zeros_like(p)
            if extra is not None:
                self._add_clipped(extra)
            self._noise_and_scale(check=extra is not None)

    def _add_clipped(self, extra: torch.Tensor) -> None:
        """Clip each row of ``extra`` as a customer's gradient is clipped, and add their sum to ``.grad``.

        A row is one per-sample gradient over all parameters, flattened in ``model.parameters()`` order
        (dense, or sparse COO: an auditor's gradient canaries touch one coordinate each, and a dense
        matrix of them would not fit in memory). This is the white-box audit's hook
        (fedcrm.evaluation.white_box_audit): the canaries then go through the very clipping, noise and
        scaling that customers do.
        """
        total = sum(p.numel() for p in self.params)
        if extra.dim() != 2 or extra.shape[1] != total:
            raise ValueError(f"extra per-sample gradients must be a (rows x {total}) matrix, got {tuple(extra.shape)}")
        rows = (extra if extra.is_sparse else extra.to_sparse()).coalesce()
        (row, col), values = rows.indices(), rows.values().to(torch.float64)
        sq_norms = torch.zeros(rows.shape[0], dtype=torch.float64).index_add_(0, row, values * values)
        clip = (self.clipping_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
        summed = torch.zeros(total, dtype=torch.float64).index_add_(0, col, values * clip[row])
        offset = 0
        for p in self.params:
            p.grad += summed[offset : offset + p.numel()].view_as(p).to(p.dtype)  # type: ignore[operator]
            offset += p.numel()

    def _noise_and_scale(self, *, check: bool) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]  # every parameter is a Linear layer's
        if check and not all(bool(torch.isfinite(g).all()) for g in grads):
            # A non-finite sum of clipped rows becomes a noise-only step: the noise is still added, so
            # what leaves is the mechanism's output whatever the rows were.
            for g in grads:
                g.zero_()
        for grad in grads:
            if self.noise_std > 0:
                grad += self.randomness.normal(grad.shape, std=self.noise_std, dtype=grad.dtype)
            grad /= self.expected_batch_size


def clip_update(weights: dict[str, np.ndarray], *, start: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """``weights`` moved back towards ``start`` so that the whole update has L2 norm at most ``norm``.

    Client-level DP's clipping, done at the region before its update leaves (the same rule as Flower's
    ``fixedclipping_mod``, here in the library so the region, not the server, decides it).
    """
    deltas = {k: weights[k].astype(np.float64) - start[k].astype(np.float64) for k in weights}
    total = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
    if not np.isfinite(total):
        # A non-finite update (weights the server chose can make training diverge) leaves as no update at all.
        return {k: start[k].astype(weights[k].dtype) for k in weights}
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return {k: (start[k] + scale * deltas[k]).astype(weights[k].dtype) for k in weights}
