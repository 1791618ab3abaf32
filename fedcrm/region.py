"""A region's side of the federation, in library terms (no Flower here).

The region reads its own table from a path its data owner configured, applies tombstones, consent and
its policy, trains locally (with DP-SGD, charged to its durable ledger before anything leaves), and
summarises its hold-out in aggregates. The Flower ClientApp only unpacks messages and calls this.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import Schema
from fedcrm.errors import DataError, PolicyError
from fedcrm.evaluation.metrics import ScoreSummary
from fedcrm.governance.policy import RegionPolicy, load_policy
from fedcrm.models import build_model, ensemble_proba, get_weights, set_weights
from fedcrm.privacy.accountant import GaussianRelease, plan_noise_multiplier
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.training import DpSgd, sampling_plan, train_locally
from fedcrm.unlearning.shards import holdout_mask, region_secret, shard_of
from fedcrm.unlearning.tombstones import Tombstones

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class NodeSettings:
    """What the data owner sets on their node: nothing of this comes from the server."""

    region: str
    data_path: Path
    state_dir: Path
    policy_path: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        missing = [k for k in ("region", "data-path", "state-dir") if not node_config.get(k)]
        if missing:
            raise DataError(
                f"this node's config lacks {missing}: start the SuperNode with "
                '--node-config \'region="eu" data-path="/data/eu.csv" state-dir="/var/lib/fedcrm/eu"\''
            )
        policy = node_config.get("policy-path")
        return cls(
            region=str(node_config["region"]),
            data_path=Path(str(node_config["data-path"])),
            state_dir=Path(str(node_config["state-dir"])),
            policy_path=Path(str(policy)) if policy else None,
        )


@dataclass
class RegionData:
    """The region's customers for one purpose, encoded, split into hold-out and training shards."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    holdout: np.ndarray
    shard: np.ndarray
    sensitive: Any
    counts: dict[str, int] = field(default_factory=dict)

    def train_shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = ~self.holdout & (self.shard == k)
        return self.x[m], self.y[m]


def release_seed(*, seed: int, region: str, shard: int, round_: int, salt: str = "train") -> int:
    """A per-(region, shard, round) seed, the same on every machine, so runs and retrains repeat."""
    text = f"{salt}|{seed}|{region}|{shard}|{round_}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


class Region:
    def __init__(self, settings: NodeSettings, *, default_budget: float | None = None) -> None:
        self.settings = settings
        self.name = settings.region
        self.policy: RegionPolicy = load_policy(settings.policy_path, default_budget=default_budget)
        self.ledger = PrivacyLedger.open(settings.state_dir, region=self.name)
        self.tombstones = Tombstones(settings.state_dir)

    # -- data --------------------------------------------------------------------------------------

    def check_request(self, cfg: ExperimentConfig, schema: Schema) -> None:
        columns = [c.name for c in schema.model_columns]
        self.policy.check_request(region=self.name, purpose=cfg.task, columns=columns, privacy_mode=cfg.privacy.mode)

    def load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        table = load_table(self.settings.data_path, schema)
        counts = {"customers_in_table": len(table)}
        forgotten = self.tombstones.mask(table.ids)
        counts["forgotten"] = int(forgotten.sum())
        table = table.subset(~forgotten)
        consent = schema.consent_for(cfg.task)
        if consent is not None:
            granted = table.consent[cfg.task].to_numpy(dtype=bool)
            counts["excluded_no_consent"] = int((~granted).sum())
            table = table.subset(granted)
        if len(table) == 0:
            raise DataError(
                f"region {self.name}: no customer can be used for purpose `{cfg.task}` "
                f"({counts.get('excluded_no_consent', 0)} lack consent, {counts['forgotten']} forgotten)",
                path=str(self.settings.data_path),
            )
        x = FeatureEncoder(schema).encode(table)
        holdout = holdout_mask(table.ids, fraction=cfg.evaluation.holdout_fraction, seed=cfg.seed)
        shard = shard_of(table.ids, shards=cfg.unlearning.shards, secret=region_secret(self.settings.state_dir))
        counts["train"] = int((~holdout).sum())
        counts["holdout"] = int(holdout.sum())
        return RegionData(
            x=x, y=table.labels, ids=table.ids, holdout=holdout, shard=shard, sensitive=table.sensitive, counts=counts
        )

    # -- training ----------------------------------------------------------------------------------

    def noise_multiplier(self, cfg: ExperimentConfig, *, n: int, delta: float) -> float:
        """σ planned once for the whole run (rounds × local epochs) so the run ends at its target ε."""
        assert cfg.privacy.target_epsilon is not None
        q, steps_per_round = sampling_plan(n=n, batch_size=cfg.training.batch_size, epochs=cfg.training.local_epochs)
        return plan_noise_multiplier(
            target_epsilon=cfg.privacy.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=steps_per_round * cfg.training.rounds,
            accountant=cfg.privacy.accountant,
        )

    def train(
        self,
        cfg: ExperimentConfig,
        schema: Schema,
        *,
        weights: Weights,
        shard: int,
        round_: int,
        run_id: str,
        delta: float,
    ) -> tuple[Weights, dict[str, float]]:
        """One round of local training on ``shard``; raises PolicyError / PrivacyBudgetError to refuse."""
        self.check_request(cfg, schema)
        data = self.load(cfg, schema)
        x, y = data.train_shard(shard)
        if len(x) < self.policy.min_customers:
            raise PolicyError(
                f"region {self.name}: shard {shard} has {len(x)} training customers, fewer than the "
                f"policy's minimum {self.policy.min_customers} behind any update"
            )
        model = build_model(cfg.model, n_features=x.shape[1], seed=0)
        set_weights(model, weights)
        q, steps = sampling_plan(n=len(x), batch_size=cfg.training.batch_size, epochs=cfg.training.local_epochs)
        dp: DpSgd | None = None
        release: GaussianRelease | None = None
        note = ""
        if cfg.privacy.mode == "sample_dp":
            sigma = self.noise_multiplier(cfg, n=len(x), delta=delta)
            self.policy.check_noise(region=self.name, noise_multiplier=sigma)
            dp = DpSgd(noise_multiplier=sigma, clipping_norm=cfg.privacy.clipping_norm)
            release = GaussianRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
        elif cfg.privacy.mode == "client_dp":
            # The whole region's update, clipped and noised by Flower's DP-FedAvg wrapper once per round.
            self.policy.check_noise(region=self.name, noise_multiplier=cfg.privacy.client_noise_multiplier)
            release = GaussianRelease(noise_multiplier=cfg.privacy.client_noise_multiplier, sample_rate=1.0, steps=1)
            note = "client_dp: noise added by the server to the aggregate"
        event_id = None
        if release is not None:
            self.ledger.check_budget(
                budget=self.policy.privacy_budget,
                delta=delta,
                accountant=cfg.privacy.accountant,
                shard=shard,
                next_release=release,
            )
            # Write-ahead: the spend is durable before the update can leave the region.
            event_id = self.ledger.record_release(
                shard=shard, purpose=cfg.task, run_id=run_id, round=round_, release=release, delta=delta, note=note
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result = train_locally(
                    model,
                    x=x,
                    y=y,
                    training=cfg.training,
                    dp=dp,
                    seed=release_seed(seed=cfg.seed, region=self.name, shard=shard, round_=round_),
                    proximal_mu=cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
                )
        except BaseException as e:
            if event_id is not None:
                self.ledger.mark_outcome(event_id, "not_sent", reason=f"training failed: {e}")
            raise
        new_weights = get_weights(model)
        if event_id is not None:
            self.ledger.mark_outcome(event_id, "sent")
        metrics = {
            "num-examples": float(len(x)),
            "train-loss": result.mean_loss,
            "noise-multiplier": dp.noise_multiplier if dp else 0.0,
            "epsilon": self.epsilon(cfg, delta=delta),
            "budget": self.policy.privacy_budget,
        }
        return new_weights, metrics

    def epsilon(self, cfg: ExperimentConfig, *, delta: float) -> float:
        return self.ledger.epsilon(delta=delta, accountant=cfg.privacy.accountant)

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, cfg: ExperimentConfig, schema: Schema, *, constituents: list[Weights]) -> ScoreSummary | None:
        """Hold-out summary of the served model (mean of constituents); None when too few customers."""
        data = self.load(cfg, schema)
        x, y = data.x[data.holdout], data.y[data.holdout]
        if len(x) < self.policy.min_customers:
            return None
        models = []
        for w in constituents:
            m = build_model(cfg.model, n_features=x.shape[1], seed=0)
            set_weights(m, w)
            models.append(m)
        scores = ensemble_proba(models, x)
        if not np.all(np.isfinite(scores)):
            raise DataError(f"region {self.name}: the model produced non-finite scores")
        return ScoreSummary.of(scores=scores, labels=y)

    def describe(self, cfg: ExperimentConfig, schema: Schema) -> dict[str, float]:
        """Aggregate counts the server needs to plan (δ below 1/N of the smallest region)."""
        data = self.load(cfg, schema)
        shard_sizes = [int((~data.holdout & (data.shard == k)).sum()) for k in range(cfg.unlearning.shards)]
        return {
            **{k: float(v) for k, v in data.counts.items()},
            "smallest-shard": float(min(shard_sizes)),
            "budget": self.policy.privacy_budget,
            "min-customers": float(self.policy.min_customers),
            "n-features": float(data.x.shape[1]),
        }
