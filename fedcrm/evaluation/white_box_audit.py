"""The white-box privacy audit: the auditor plays the server and sees every round's update of a region.

This is the strongest position fedcrm's DP must hold against (the server writes the config and
receives the updates), so it is where a broken mechanism shows. The audit runs the region's real
DP-SGD path (:func:`fedcrm.training.train_locally`, :class:`fedcrm.privacy.clipping.LinearStackDpSgd`,
the region's secret :class:`~fedcrm.privacy.randomness.ReleaseRandomness`) with the σ, q and steps the
region plans, plus **gradient (Dirac) canaries** (Steinke, Nasr and Jagielski 2023, §6):

- ``m`` canaries, each included with probability 1/2 by the auditor's own coin. Canary j is a
  per-sample gradient of norm C on one coordinate of its own, Poisson-sampled at every step like a
  customer and clipped and noised with the customers (the ``canaries`` hook of ``train_locally``).
- Its coordinate is the weight of an extra input column that is zero for every customer: no customer's
  gradient ever touches it and the model's predictions never depend on it, so the canaries measure the
  mechanism (sampling, clipping, noise), not the data.
- Training uses plain SGD, so a round's update is ``−lr / B ×`` the sum of that round's noisy gradients:
  canary j's score is minus the sum over rounds of its coordinate's update, in units of C.
- The scores go to the one-run bound (:func:`fedcrm.evaluation.privacy_audit.one_run_audit`), and the
  lower bound is checked against the ε the ledger would charge for the same releases at the region's δ.

Planted bugs (:class:`PlantedBug`, for tests only, never from a config) break the mechanism the way
fedcrm 0.1 was broken, to show that the audit catches it: noise from a public seed (which the auditor
regenerates and subtracts), and σ divided by 10 while the claim keeps the stated σ.
"""

from __future__ import annotations

import enum
import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcrm.config import ExperimentConfig, ModelConfig, TrainingConfig
from fedcrm.evaluation.privacy_audit import OneRunResult, one_run_audit, verdict
from fedcrm.models import build_model
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.training import DpSgd, sampling_plan, train_locally

DEFAULT_CANARIES = 1000


class PlantedBug(enum.Enum):
    """A broken mechanism the audit must catch. Tests only: no config or command can ask for one."""

    PUBLIC_SEED = "public_seed"  # fedcrm 0.1: noise and sampling from a seed derived from the config
    SIGMA_OVER_10 = "sigma_over_10"  # σ/10 in the noise, the stated σ in the ledger's claim


@dataclass(frozen=True)
class WhiteBoxAudit:
    """The audit of one region's mechanism, its claim and its verdict."""

    result: OneRunResult
    claimed_epsilon: float
    noise_multiplier: float  # the σ stated (and claimed)
    sample_rate: float
    steps_per_round: int
    rounds: int
    planted_bug: str | None

    @property
    def epsilon_lower_bound(self) -> float:
        return self.result.epsilon_lower_bound

    @property
    def verdict(self) -> str:
        return verdict(self.epsilon_lower_bound, claimed_epsilon=self.claimed_epsilon)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"mode": "white-box", **d.pop("result"), **d, "verdict": self.verdict}


def _public_round_seed(seed: int, round_: int) -> int:
    """What fedcrm 0.1 did: a release's seed from values in the config and the protocol."""
    return int.from_bytes(hashlib.sha256(f"{seed}|round|{round_}".encode()).digest()[:16], "big")


def _replayed_noise(
    randomness: ReleaseRandomness,
    *,
    steps: int,
    rows: int,
    q: float,
    shapes: list[torch.Size],
    coordinates: np.ndarray,
    std: float,
) -> np.ndarray:
    """The noise a release drew on ``coordinates``, summed over its steps, regenerated from its seed.

    Mirrors the order in which train_locally draws: each step's Poisson sample, then one Gaussian
    tensor per parameter in ``model.parameters()`` order. Only possible when the seed is known: the
    planted bug.
    """
    total = np.zeros(len(coordinates))
    for _ in range(steps):
        randomness.poisson_sample(rows, q=q)
        flat = torch.cat([randomness.normal(s, std=std, dtype=torch.float32).reshape(-1) for s in shapes])
        total += flat.numpy()[coordinates]
    return total


def white_box_audit(
    *,
    x: np.ndarray,
    y: np.ndarray,
    model: ModelConfig,
    training: TrainingConfig,
    noise_multiplier: float,
    clipping_norm: float,
    delta: float,
    accountant: str = "rdp",
    planned_customers: int | None = None,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
    auditor_rng: np.random.Generator | None = None,
    planted_bug: PlantedBug | None = None,
    public_seed: int = 0,
) -> WhiteBoxAudit:
    """Run ``training.rounds`` rounds of the region's DP-SGD with ``canaries`` gradient canaries; bound ε.

    ``x, y`` are the region's training customers; ``planned_customers`` the public size q and the steps
    are planned from (as the region plans them). The claim is the composition of the rounds' releases
    at the stated σ. ``auditor_rng`` is the auditor's coin for which canaries go in (fresh when None).
    """
    if canaries < 2:
        raise ValueError(f"the audit needs at least 2 canaries, got {canaries}")
    rng = auditor_rng or np.random.default_rng()
    included = rng.random(canaries) < 0.5
    n, d = x.shape
    # The canaries' own input columns: zero for every customer (see the module docstring).
    x_audit = np.hstack([np.asarray(x, dtype=np.float32), np.zeros((n, canaries), dtype=np.float32)])
    net = build_model(model, n_features=d + canaries, seed=0)
    # The first parameter is the first Linear layer's weight (out × in): row 0, column d + j is flat d + j.
    coordinates = d + np.arange(canaries)
    params = sum(p.numel() for p in net.parameters())
    chosen = np.flatnonzero(included)
    rows = torch.from_numpy(np.vstack([np.arange(len(chosen)), coordinates[chosen]]))
    canary_grads = torch.sparse_coo_tensor(
        rows, torch.full((len(chosen),), float(clipping_norm)), (len(chosen), params), check_invariants=True
    ).coalesce()

    sgd = training.model_copy(update={"optimizer": "sgd"})  # the update is linear in the noisy gradients
    sigma_used = noise_multiplier / 10 if planted_bug is PlantedBug.SIGMA_OVER_10 else noise_multiplier
    dp = DpSgd(noise_multiplier=sigma_used, clipping_norm=clipping_norm)
    q, steps = sampling_plan(n=planned_customers or n, batch_size=sgd.batch_size, epochs=sgd.local_epochs)
    first = next(iter(net.parameters()))
    moved = np.zeros(canaries)  # the sum over rounds of the canary coordinates' updates, as the server sees
    removed = np.zeros(canaries)  # the noise an auditor who knows the seed subtracts
    for round_ in range(sgd.rounds):
        if planted_bug is PlantedBug.PUBLIC_SEED:
            randomness = ReleaseRandomness.public_seed(_public_round_seed(public_seed, round_))
            removed += _replayed_noise(
                ReleaseRandomness.public_seed(_public_round_seed(public_seed, round_)),
                steps=steps,
                rows=n + len(chosen),
                q=q,
                shapes=[p.shape for p in net.parameters()],
                coordinates=coordinates,
                std=dp.noise_multiplier * clipping_norm,
            )
        else:
            randomness = ReleaseRandomness.secure()
        before = first.detach().reshape(-1)[coordinates].double().numpy().copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            train_locally(
                net,
                x=x_audit,
                y=y,
                training=sgd,
                dp=dp,
                randomness=randomness,
                planned_customers=planned_customers,
                canaries=canary_grads,
            )
        moved += first.detach().reshape(-1)[coordinates].double().numpy() - before
    # −update × B / lr is the sum of the noisy gradients; in units of C, an included canary adds 1 per
    # step it was sampled in, an excluded one nothing.
    scores = (-moved * sgd.batch_size / sgd.learning_rate - removed) / clipping_norm
    result = one_run_audit(scores, included, delta=delta, confidence=confidence)
    claimed = epsilon([GaussianRelease(noise_multiplier, q, steps)] * sgd.rounds, delta=delta, accountant=accountant)
    return WhiteBoxAudit(
        result=result,
        claimed_epsilon=claimed,
        noise_multiplier=noise_multiplier,
        sample_rate=q,
        steps_per_round=steps,
        rounds=sgd.rounds,
        planted_bug=planted_bug.value if planted_bug else None,
    )


def audit_region_white_box(
    *,
    region: str,
    cfg: ExperimentConfig,
    data_path: Path,
    state_dir: Path,
    policy_path: Path | None,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The white-box audit of one region, run where its data is: its table, state, policy and plan.

    The region's training customers of shard 0, σ as the region plans it for the run's config from its
    declared size, δ from its policy. Nothing is charged to the region's ledger: the audit's training
    is released to nobody.
    """
    from fedcrm.data.schema import load_schema
    from fedcrm.errors import ConfigError, StorageError
    from fedcrm.node_settings import owner_settings
    from fedcrm.region import Region

    if cfg.privacy.mode != "sample_dp":
        raise ConfigError(
            f"privacy.mode is {cfg.privacy.mode}: the white-box audit checks sample-level DP-SGD "
            "(privacy.mode: sample_dp), the only mode that claims DP against the server"
        )
    if not state_dir.is_dir():
        raise StorageError(f"region {region}: no state under {state_dir}; pass the --state folder the run used")
    r = Region(owner_settings(cfg, region=region, data_path=data_path, state_dir=state_dir, policy_path=policy_path))
    schema = load_schema(cfg.schema_path)
    x, y = r.load(cfg, schema).train_shard(0)
    declared = r.declared_shard(cfg, schema)  # q as the region plans it: from its declared size
    sigma = r.noise_multiplier(cfg, n=declared)
    audit = white_box_audit(
        x=x,
        y=y,
        model=cfg.model,
        training=cfg.training,
        noise_multiplier=sigma,
        clipping_norm=cfg.privacy.clipping_norm,
        delta=r.delta,
        accountant=cfg.privacy.accountant,
        planned_customers=declared,
        canaries=canaries,
        confidence=confidence,
    )
    return {**audit.as_dict(), "privacy_mode": cfg.privacy.mode, "customers": len(x), "declared_customers": declared}
