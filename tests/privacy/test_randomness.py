"""The randomness of a release: secret, fresh per release, never a 32-bit torch seed; sampling is Poisson."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcrm.config import ModelConfig, TrainingConfig
from fedcrm.models import build_model, get_weights
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import DpSgd, train_locally


def test_each_customer_is_in_with_probability_q_and_batch_sizes_are_binomial() -> None:
    n, q, draws = 60, 0.1, 20_000
    rnd = ReleaseRandomness.public_seed(7)
    counts = np.zeros(n)
    sizes = np.zeros(draws)
    for t in range(draws):
        idx = rnd.poisson_sample(n, q=q).numpy()
        assert len(np.unique(idx)) == len(idx) and (idx >= 0).all() and (idx < n).all()
        counts[idx] += 1
        sizes[t] = len(idx)
    sd = np.sqrt(q * (1 - q) / draws)
    assert np.abs(counts / draws - q).max() < 5 * sd  # every position, including the first and last
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.05
    assert abs(np.mean(sizes == 0) - (1 - q) ** n) < 0.002  # empty batches as often as with coins


def test_large_regions_and_full_sampling() -> None:
    rnd = ReleaseRandomness.public_seed(0)
    sizes = [len(rnd.poisson_sample(100_000, q=0.3)) for _ in range(50)]
    assert abs(np.mean(sizes) - 30_000) < 5 * np.sqrt(30_000 * 0.7 / 50)
    assert torch.equal(rnd.poisson_sample(5, q=1.0), torch.arange(5))


def test_noise_is_standard_normal_scaled() -> None:
    draw = ReleaseRandomness.secure().normal((200_000,), std=2.5, dtype=torch.float32)
    assert draw.dtype == torch.float32
    assert abs(float(draw.mean())) < 5 * 2.5 / np.sqrt(200_000)
    assert abs(float(draw.std()) / 2.5 - 1) < 0.01


def test_keys_keep_every_bit_unlike_a_cpu_torch_seed() -> None:
    # The flaw being fixed: torch's CPU generator keeps 32 bits of its seed, so 2**32 + 1 draws like 1.
    assert torch.equal(
        torch.randn(4, generator=torch.Generator().manual_seed(1)),
        torch.randn(4, generator=torch.Generator().manual_seed(2**32 + 1)),
    )
    a = ReleaseRandomness(1, mode="reproducible").normal((4,), std=1.0, dtype=torch.float32)
    b = ReleaseRandomness(2**32 + 1, mode="reproducible").normal((4,), std=1.0, dtype=torch.float32)
    c = ReleaseRandomness(2**200 + 1, mode="reproducible").normal((4,), std=1.0, dtype=torch.float32)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_secure_keys_are_fresh_every_time() -> None:
    draws = {tuple(ReleaseRandomness.secure().normal((3,), std=1.0, dtype=torch.float64).tolist()) for _ in range(20)}
    assert len(draws) == 20


def test_reproducible_keys_need_the_region_secret_and_differ_per_nonce() -> None:
    def draw(secret: str, nonce: str) -> list[float]:
        return (
            ReleaseRandomness.reproducible(region_secret=secret, nonce=nonce)
            .normal((3,), std=1.0, dtype=torch.float64)
            .tolist()
        )

    assert draw("s" * 64, "ledger:eu:1") == draw("s" * 64, "ledger:eu:1")  # the region can replay
    assert draw("s" * 64, "ledger:eu:1") != draw("s" * 64, "ledger:eu:2")  # every release its own key
    assert draw("s" * 64, "ledger:eu:1") != draw("t" * 64, "ledger:eu:1")  # nobody else can
    with pytest.raises(ValueError):
        ReleaseRandomness.reproducible(region_secret="", nonce="x")


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 5), dtype=np.float32)
    return x, (x[:, 0] > 0.5).astype(np.float32)


def test_empty_poisson_batches_still_take_a_noisy_step() -> None:
    # Old code skipped the step on an empty batch (no noise at all) while the ledger charged a noisy step:
    # with q tiny almost every batch is empty, and the weights must still move by the noise.
    x, y = _data(200)
    model = build_model(ModelConfig(kind="logistic"), n_features=5, seed=0)
    before = get_weights(model)
    training = TrainingConfig(local_epochs=1, batch_size=1, optimizer="sgd", learning_rate=0.1)
    dp = DpSgd(noise_multiplier=2.0, clipping_norm=1.0)
    result = train_locally(
        model,
        x=x[:1],
        y=y[:1],
        training=training,
        dp=dp,
        randomness=ReleaseRandomness.public_seed(3),
        planned_customers=10_000,
    )
    assert result.steps == 10_000 and result.empty_batches >= 9_990
    # 10,000 noisy steps move each weight by ~N(0, (lr·σ·C·√steps / B)²) = N(0, 20²); the few non-empty steps
    # alone could move the six weights by at most lr·C·(their number) each, about 1 in all.
    moved = sum(float(np.abs(get_weights(model)[k] - before[k]).sum()) for k in before)
    assert moved > 20


@pytest.mark.parametrize("spec", [ModelConfig(kind="logistic"), ModelConfig(kind="mlp", hidden=(8,))])
def test_the_opacus_path_draws_its_noise_from_the_release_randomness(
    spec: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedcrm.training as training_module

    monkeypatch.setattr(training_module, "supports", lambda model: False)  # force Opacus's ghost clipping
    x, y = _data(300)
    training = TrainingConfig(local_epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.1)

    def trained(rnd: ReleaseRandomness) -> dict[str, np.ndarray]:
        torch.manual_seed(0)  # Opacus's own generator: must not matter
        model = build_model(spec, n_features=5, seed=1)
        train_locally(
            model, x=x, y=y, training=training, dp=DpSgd(noise_multiplier=1.0, clipping_norm=1.0), randomness=rnd
        )
        return get_weights(model)

    same_a = trained(ReleaseRandomness(5, mode="reproducible"))
    same_b = trained(ReleaseRandomness(5, mode="reproducible"))
    other = trained(ReleaseRandomness(6, mode="reproducible"))
    for k in same_a:
        np.testing.assert_array_equal(same_a[k], same_b[k])
    assert any(not np.array_equal(same_a[k], other[k]) for k in same_a)
