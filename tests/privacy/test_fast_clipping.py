"""The one-pass clipping path (fedcrm.privacy.clipping) against references: a per-customer loop and Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fedcrm.training as training_module
from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.clipping import LinearStackDpSgd, supports
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import DpSgd, train_locally


def _data(n: int = 300, d: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, d), dtype=np.float32)
    y = (x[:, 0] + 0.3 * rng.standard_normal(n) > 0.5).astype(np.float32)
    return x, y


def test_clipped_gradient_equals_a_per_customer_loop_of_clip_and_sum() -> None:
    model = build_model(ModelConfig(kind="mlp", hidden=(5, 4)), n_features=7, seed=3)
    x, y = (torch.from_numpy(a) for a in _data(n=9))
    clip, batch = 0.05, 16  # small C so that most customers are clipped
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[i : i + 1]).squeeze(-1), y[i : i + 1])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for e, g in zip(expected, grads, strict=True):
            e += factor * g / batch
    model.zero_grad()
    dp = LinearStackDpSgd(
        model,
        noise_multiplier=0.0,
        clipping_norm=clip,
        expected_batch_size=batch,
        randomness=ReleaseRandomness.public_seed(0),
    )
    dp.compute_grads(x, y)
    for e, p in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", [ModelConfig(kind="mlp", hidden=(16, 8)), ModelConfig(kind="logistic")])
def test_one_pass_path_gives_the_same_weights_as_opacus_ghost_clipping(
    spec: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data()
    training = TrainingConfig(local_epochs=2, batch_size=32, optimizer="adam", learning_rate=0.01)
    dp = DpSgd(noise_multiplier=0.8, clipping_norm=0.5)

    def trained() -> dict[str, np.ndarray]:
        model = build_model(spec, n_features=x.shape[1], seed=1)
        train_locally(model, x=x, y=y, training=training, dp=dp, randomness=ReleaseRandomness.public_seed(42))
        return get_weights(model)

    fast = trained()
    assert trained().keys() == fast.keys()
    for k, v in trained().items():  # same seed, same weights (bit for bit)
        np.testing.assert_array_equal(v, fast[k])
    monkeypatch.setattr(training_module, "supports", lambda model: False)  # force Opacus's ghost clipping
    opacus = trained()
    for k in fast:
        np.testing.assert_allclose(fast[k], opacus[k], rtol=1e-4, atol=1e-5)


def test_models_with_batch_statistics_or_randomness_go_to_opacus() -> None:
    assert supports(build_model(ModelConfig(kind="mlp", hidden=(4,)), n_features=3, seed=0))
    assert not supports(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))
    assert not supports(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 1)))
    assert not supports(nn.Sequential(nn.Linear(3, 2)))  # not one logit
