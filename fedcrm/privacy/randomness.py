"""The randomness of a DP release: the Poisson sample and the Gaussian noise, keyed at the region.

DP-SGD's guarantee assumes that whoever receives the update cannot predict the noise or the sample.
The server writes the config and receives the updates, so nothing it knows may decide them:

- ``secure`` (the default): a fresh 256-bit key from the OS's secure source (:mod:`secrets`) for every
  release, never stored and never sent.
- ``reproducible`` (research and tests, only where the region's policy allows it): the key is an HMAC
  of the release's nonce under the region's secret. The nonce is the release's ledger identity
  (the ledger's random id and the event's number), so every release still gets its own key, the region
  can replay a release exactly, and nobody without the region's secret can.

The key is expanded by numpy's PCG64DXSM (128-bit state) seeded through ``SeedSequence``, which keeps
every bit of the key. ``torch.Generator().manual_seed`` is never used for a release: on CPU it keeps
only the low 32 bits of its seed, so any seed would be open to a 2^32 search.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

NoiseMode = Literal["secure", "reproducible", "public_seed"]
NOISE_MODES: tuple[str, ...] = ("secure", "reproducible")  # what a region may use for a release
KEY_BITS = 256


class ReleaseRandomness:
    """The random source of one release: Poisson samples and Gaussian noise, from one secret key.

    Build it with :meth:`secure` or :meth:`reproducible`; the key is kept only inside the generator.
    """

    def __init__(self, key: int, *, mode: NoiseMode) -> None:
        if key.bit_length() > KEY_BITS or key < 0:
            raise ValueError(f"a release key is a non-negative integer of at most {KEY_BITS} bits")
        self.mode = mode
        self._rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(key)))

    @classmethod
    def secure(cls) -> ReleaseRandomness:
        """A fresh key from the OS's secure source, known to nobody, not even the region afterwards."""
        return cls(secrets.randbits(KEY_BITS), mode="secure")

    @classmethod
    def reproducible(cls, *, region_secret: str, nonce: str) -> ReleaseRandomness:
        """A key only the holder of ``region_secret`` can derive; ``nonce`` must never repeat."""
        if not region_secret or not nonce:
            raise ValueError("a reproducible release needs the region's secret and a nonce")
        digest = hmac.new(region_secret.encode(), f"fedcrm-release|{nonce}".encode(), hashlib.sha256).digest()
        return cls(int.from_bytes(digest, "big"), mode="reproducible")

    @classmethod
    def public_seed(cls, seed: int) -> ReleaseRandomness:
        """Randomness anyone can regenerate from ``seed``: for training that releases nothing under DP
        (the pooled, non-private baseline) and for tests that plant a broken mechanism. Never a region's."""
        return cls(int(seed) % (1 << KEY_BITS), mode="public_seed")

    def normal(self, shape: torch.Size | tuple[int, ...], *, std: float, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise N(0, std²) of ``shape`` as a torch tensor."""
        import torch  # here, not at the top: loading a region's customers (no draw) must not import torch

        draw = self._rng.standard_normal(tuple(shape), dtype=np.float32 if dtype == torch.float32 else np.float64)
        if std != 1.0:
            draw *= std
        return torch.from_numpy(draw)

    def poisson_sample(self, n: int, *, q: float) -> torch.Tensor:
        """Indices of a Poisson sample of ``range(n)``: each customer in independently with probability ``q``.

        Drawn as geometric gaps between the chosen customers (P(gap > k) = (1 - q)^k), the same
        distribution as a coin per customer at O(q·n) instead of O(n) per step: on a large region with
        a small batch, one random number per customer per step was most of a step's time.
        """
        import torch  # see normal

        if q >= 1.0:
            return torch.arange(n)
        log_keep = math.log1p(-q)
        chunk = int(q * n + 6 * math.sqrt(q * n) + 16)  # almost always one draw
        parts: list[np.ndarray] = []
        last = -1
        while True:
            u = self._rng.random(chunk)
            gaps = np.floor(np.log1p(-u) / log_keep).astype(np.int64) + 1
            idx = last + np.cumsum(gaps)
            inside = idx[idx < n]
            parts.append(inside)
            if len(inside) < chunk:
                return torch.from_numpy(np.concatenate(parts))
            last = int(idx[-1])
