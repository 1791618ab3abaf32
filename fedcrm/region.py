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
from fedcrm.data.io import RowBoundedCache, file_version, load_table
from fedcrm.data.schema import Schema
from fedcrm.errors import DataError, PolicyError, PrivacyBudgetError
from fedcrm.evaluation.metrics import ScoreSummary
from fedcrm.evaluation.trust import TrustSummary
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import finite, node_actor, record_policy_if_changed, region_audit_log
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.eligibility import usable_for
from fedcrm.governance.policy import RegionPolicy, load_policy
from fedcrm.models import build_model, ensemble_proba, get_weights, set_weights
from fedcrm.privacy.accountant import GaussianRelease, plan_noise_multiplier
from fedcrm.privacy.ledger import PrivacyLedger
from fedcrm.training import DpSgd, sampling_plan, train_locally
from fedcrm.unlearning.shards import holdout_mask, region_secret, region_secret_path, shard_of
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


# What this process has derived from regions' tables, shared by every Region object it makes: the
# client process between messages, and the data owner's commands (forget, retrain) between their steps.
# Keyed by every input file, so it is never stale (see Region.load).
PROCESS_CACHE = RowBoundedCache()


class Region:
    def __init__(
        self, settings: NodeSettings, *, default_budget: float | None = None, cache: RowBoundedCache | None = None
    ) -> None:
        self.settings = settings
        self.cache = cache or PROCESS_CACHE
        self.name = settings.region
        self.policy: RegionPolicy = load_policy(settings.policy_path, default_budget=default_budget)
        self.ledger = PrivacyLedger.open(settings.state_dir, region=self.name)
        self.tombstones = Tombstones(settings.state_dir)
        self.consent_withdrawals = ConsentWithdrawals(settings.state_dir)
        self.audit = region_audit_log(settings.state_dir)
        record_policy_if_changed(self.audit, region=self.name, policy=self.policy, path=settings.policy_path)

    def _audit_refusal(self, error: Exception, **context: Any) -> None:
        self.audit.append(
            actor=node_actor(self.name),
            action=AuditAction.REFUSAL,
            details=finite({"reason": str(error), "kind": type(error).__name__, **context}),
        )

    # -- data --------------------------------------------------------------------------------------

    def check_request(self, cfg: ExperimentConfig, schema: Schema) -> None:
        columns = [c.name for c in schema.model_columns]
        try:
            self.policy.check_request(
                region=self.name, purpose=cfg.task, columns=columns, privacy_mode=cfg.privacy.mode
            )
        except PolicyError as e:
            self._audit_refusal(e, purpose=cfg.task, config_sha256=cfg.digest())
            raise

    def load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        """The region's customers for ``cfg.task``, encoded; kept by the client process between messages.

        The cache key names every input: the table file, the tombstones, the consent withdrawals and
        the region's secret (each by inode, modification time and size), the schema and the settings that
        pick the hold-out and the shards. Any change to one of them builds the data again.
        """
        table_version = file_version(self.settings.data_path)
        if table_version is None:
            return self._load(cfg, schema)  # the missing file is reported in the usual words
        state = self.settings.state_dir
        key = (
            "region-data", self.name, str(self.settings.data_path.resolve()), table_version,
            file_version(self.tombstones.path), file_version(self.consent_withdrawals.path),
            str(state.resolve()), file_version(region_secret_path(state)), schema.model_dump_json(), cfg.task,
            cfg.evaluation.holdout_fraction, cfg.seed, cfg.unlearning.shards,
        )
        return self.cache.remember(key, lambda: self._load(cfg, schema), rows=lambda d: len(d.ids))

    def _load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        # The table itself is not cached: the encoded result is what is kept, and keeping the table
        # too would double the rows held for each region and evict sooner.
        table, counts = usable_for(load_table(self.settings.data_path, schema), purpose=cfg.task,
                                   tombstones=self.tombstones, withdrawals=self.consent_withdrawals)
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

    def noise_multiplier(
        self, cfg: ExperimentConfig, *, n: int, delta: float, run_id: str | None = None, shard: int = 0
    ) -> float:
        """σ planned once for the whole run (rounds × local epochs) so the run ends at its target ε.

        With ``run_id``, a σ this run already planned for the same shard, rate, steps and δ is read back
        from the ledger instead of re-planned: the bisection over the accountant was most of a round's
        work on a small region (docs/benchmarks.md), and its answer cannot have changed.
        """
        assert cfg.privacy.target_epsilon is not None
        q, steps_per_round = sampling_plan(n=n, batch_size=cfg.training.batch_size, epochs=cfg.training.local_epochs)
        if run_id is not None:
            for event in self.ledger.events(shard):
                if (event.run_id, event.sample_rate, event.steps, event.delta, event.purpose) == (
                    run_id, q, steps_per_round, delta, cfg.task
                ):
                    return event.noise_multiplier
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
        """One round of local training on ``shard``; raises PolicyError / PrivacyBudgetError to refuse.

        Every refusal and every release that left goes into the region's audit log.
        """
        self.check_request(cfg, schema)  # audits its own refusal
        try:
            return self._train_round(
                cfg, schema, weights=weights, shard=shard, round_=round_, run_id=run_id, delta=delta
            )
        except (PolicyError, PrivacyBudgetError) as e:
            self._audit_refusal(e, purpose=cfg.task, run_id=run_id, round=round_, shard=shard)
            raise

    def _train_round(
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
        data = self.load(cfg, schema)  # train() has checked the request against the policy
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
            sigma = self.noise_multiplier(cfg, n=len(x), delta=delta, run_id=run_id, shard=shard)
            self.policy.check_noise(region=self.name, noise_multiplier=sigma)
            dp = DpSgd(noise_multiplier=sigma, clipping_norm=cfg.privacy.clipping_norm)
            release = GaussianRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
        elif cfg.privacy.mode == "client_dp":
            # The whole region's update, clipped and noised by Flower's DP-FedAvg wrapper once per round.
            self.policy.check_noise(region=self.name, noise_multiplier=cfg.privacy.client_noise_multiplier)
            release = GaussianRelease(noise_multiplier=cfg.privacy.client_noise_multiplier, sample_rate=1.0, steps=1)
            note = "client_dp: noise added by the server to the aggregate"
        event_id = None
        shard_epsilon: dict[int, float] = {}  # this shard's ε once the release is recorded, composed once
        if release is not None:
            shard_epsilon[shard] = self.ledger.check_budget(
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
            "epsilon": self.ledger.epsilon(delta=delta, accountant=cfg.privacy.accountant, known=shard_epsilon),
            "budget": self.policy.privacy_budget,
        }
        if release is not None:
            self.audit.append(
                actor=node_actor(self.name),
                action=AuditAction.PRIVACY_SPENT,
                details=finite({
                    "run_id": run_id, "purpose": cfg.task, "round": round_, "shard": shard,
                    "ledger_event": event_id, "noise_multiplier": release.noise_multiplier,
                    "sample_rate": release.sample_rate, "steps": release.steps, "delta": delta,
                    "epsilon_spent_total": metrics["epsilon"], "budget": self.policy.privacy_budget,
                    "mode": cfg.privacy.mode,
                }),
            )
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

    def trust_summary(
        self, cfg: ExperimentConfig, schema: Schema, *, constituents: list[Weights]
    ) -> TrustSummary | None:
        """Fairness histograms per sensitive group and summed |contributions| per column, on the hold-out.

        None when the hold-out is below the policy's minimum; groups below it are suppressed inside.
        """
        from fedcrm.evaluation.explain import importance_sums
        from fedcrm.evaluation.fairness import summarise_groups

        data = self.load(cfg, schema)
        x, y = data.x[data.holdout], data.y[data.holdout]
        if len(x) < self.policy.min_customers:
            return None
        models = []
        for w in constituents:
            m = build_model(cfg.model, n_features=x.shape[1], seed=0)
            set_weights(m, w)
            models.append(m)
        sensitive = data.sensitive.iloc[np.flatnonzero(data.holdout)].reset_index(drop=True)
        groups = summarise_groups(
            scores=ensemble_proba(models, x), labels=y, sensitive=sensitive, schema=schema,
            min_customers=self.policy.min_customers,
        )
        return TrustSummary(groups=groups, importance_sum=importance_sums(models, schema=schema, x=x),
                            customers=len(x))

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
