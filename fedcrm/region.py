"""A region's side of the federation, in library terms (no Flower here).

The region reads its own table from a path its data owner configured, applies tombstones, consent and
its policy, trains locally (with DP-SGD, charged to its durable ledger before anything leaves), and
summarises its hold-out in aggregates. The Flower ClientApp only unpacks messages and calls this.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import RowBoundedCache, file_version, load_table
from fedcrm.data.schema import Schema
from fedcrm.data.schema_match import owned_schema, owner_schema
from fedcrm.errors import DataError, PolicyError, PrivacyBudgetError, RegionDataUnusable
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import finite, node_actor, record_policy_if_changed, region_audit_log
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.governance.eligibility import usable_for
from fedcrm.governance.policy import RegionPolicy, load_policy
from fedcrm.node_settings import NodeSettings
from fedcrm.privacy.accountant import GaussianRelease, NonPrivateRelease, Release, plan_noise_multiplier
from fedcrm.privacy.client_dp import client_dp_release
from fedcrm.privacy.ledger import (
    NOISE_REPRODUCIBLE,
    POPULATION_TRAIN,
    PrivacyLedger,
    population_label,
)
from fedcrm.region_answers import HoldoutAnswers
from fedcrm.region_data import RegionData
from fedcrm.region_surface import (
    check_declared_shard,
    declared_shard_size,
    declared_training,
    warn_if_exact_sizes,
)
from fedcrm.unlearning.shards import holdout_mask, region_secret, region_secret_path, shard_of
from fedcrm.unlearning.tombstones import Tombstones

if TYPE_CHECKING:
    # torch's side (models, DP-SGD, noise) is imported where a region trains: a data owner's commands
    # load a region's customers without it (tests/core/test_import_budget.py).
    from fedcrm.privacy.randomness import ReleaseRandomness
    from fedcrm.training import DpSgd

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainRelease:
    """One round's update as it leaves the region, with the public figures that go with it.

    Only public figures: the weight (the declared size, or 1: client-level DP averages regions
    uniformly), σ (a function of public values) and the ledger's ε. The training loss, computed on
    customers from weights the server chose, is not among them.
    """

    weights: Weights
    weight: float  # the update's weight in the server's average
    noise_multiplier: float  # σ of DP-SGD; 0 when the region adds no noise itself
    epsilon: float  # the region's ε after this release, over its whole ledger
    budget: float  # the policy's privacy budget


@dataclass(frozen=True)
class RegionProfile:
    """What the server learns about a region before a run: public figures only.

    Sizes as the policy declares them (its ``declared_customers``, else a count rounded to its public
    step), and the smallest shard is the declared size over the shard count, never a count of a shard:
    a +1 in "forgotten" between two runs would tell the server that someone asked to be erased.
    """

    declared_customers: float  # training customers, as declared
    smallest_shard: float  # the smallest training shard, as declared
    budget: float
    delta: float
    min_customers: int  # the policy's minimum behind any update
    features: int  # width of the encoded feature vector


# What this process has derived from regions' tables, shared by every Region object it makes: the
# client process between messages, and the data owner's commands (forget, retrain) between their steps.
# Keyed by every input file, so it is never stale (see Region.load).
PROCESS_CACHE = RowBoundedCache()


class Region(HoldoutAnswers):
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
        warn_if_exact_sizes(self.policy, region=self.name)

    def _audit_refusal(self, error: Exception, **context: Any) -> None:
        self.audit.append(
            actor=node_actor(self.name),
            action=AuditAction.REFUSAL,
            details=finite({"reason": str(error), "kind": type(error).__name__, **context}),
        )

    # -- data --------------------------------------------------------------------------------------

    def owned_schema(self, schema: Schema) -> Schema:
        """The schema this region reads its table with for a run that sent ``schema``: its data owner's own,
        with the run's choice among the owner's features; refused (PolicyError) if the run's differs in
        anything else (fedcrm.data.schema_match). Every keyed hash is then keyed on the owner's id."""
        return owned_schema(schema, owner=owner_schema(self.settings.schema_path), region=self.name)

    def check_request(self, cfg: ExperimentConfig, schema: Schema) -> None:
        try:
            schema = self.owned_schema(schema)  # before the policy: its columns are then the owner's
            columns = [c.name for c in schema.model_columns]
            self.policy.check_request(
                region=self.name,
                purpose=cfg.task,
                columns=columns,
                privacy_mode=cfg.privacy.mode,
                noise=cfg.privacy.noise,
                delta=cfg.privacy.delta,
                holdout_fraction=cfg.evaluation.holdout_fraction,
                label=schema.label.column,
                accountant=cfg.privacy.accountant,
            )
            self.policy.check_shards(region=self.name, shards=cfg.unlearning.shards)
        except PolicyError as e:
            self._audit_refusal(e, purpose=cfg.task, config_sha256=cfg.digest())
            raise

    def load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        """The region's customers for ``cfg.task``, encoded; kept by the client process between messages.

        The cache key names every input: the table file, the tombstones, the consent withdrawals and
        the region's secret (each by inode, modification time and size), the schema and the settings that
        pick the hold-out and the shards. Any change to one of them builds the data again. The schema is the
        owner's (:meth:`owned_schema`), checked here too, so no path reads a row under the server's.
        """
        schema = self.owned_schema(schema)
        try:
            return self._load_cached(cfg, schema)
        except DataError as e:
            # Which check failed (a label, an id, a cell) would be a bit about the data: the server is
            # told one fixed code, the data owner the file, line and column.
            self._audit_refusal(e, purpose=cfg.task, config_sha256=cfg.digest())
            raise RegionDataUnusable(f"region {self.name}: its table cannot be used: {e}") from e

    def _load_cached(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        table_version = file_version(self.settings.data_path)
        if table_version is None:
            return self._load(cfg, schema)  # the missing file is reported in the usual words
        state = self.settings.state_dir
        key = (
            "region-data",
            self.name,
            str(self.settings.data_path.resolve()),
            table_version,
            file_version(self.tombstones.path),
            file_version(self.consent_withdrawals.path),
            str(state.resolve()),
            file_version(region_secret_path(state)),
            schema.model_dump_json(),
            self._declared_schema(schema).model_dump_json(),  # the table is checked under all of it (_load)
            cfg.task,
            self.policy.holdout_fraction,
            cfg.unlearning.shards,
            self.settings.delimiter,
        )
        return self.cache.remember(key, lambda: self._load(cfg, schema), rows=lambda d: len(d.ids))

    def _declared_schema(self, schema: Schema) -> Schema:
        """The schema the table is read and checked under: the owner's, every declared feature, whichever the
        run chose. Else a blank in a feature would fail only the runs that choose it: a choice would probe it."""
        return owner_schema(self.settings.schema_path) or schema

    def _load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        # The table itself is not cached: the encoded result is what is kept, and keeping the table
        # too would double the rows held for each region and evict sooner.
        table, counts = usable_for(
            load_table(self.settings.data_path, self._declared_schema(schema), delimiter=self.settings.delimiter),
            purpose=cfg.task,
            tombstones=self.tombstones,
            withdrawals=self.consent_withdrawals,
        )
        # No customer usable for the purpose is not a failure: the server sees the declared size (0 below
        # half a step), and a refusal on it reads as that of any small region.
        x = FeatureEncoder(schema).encode(table)
        holdout = holdout_mask(
            table.ids, fraction=self.policy.holdout_fraction, secret=region_secret(self.settings.state_dir)
        )
        shard = shard_of(table.ids, shards=cfg.unlearning.shards, secret=region_secret(self.settings.state_dir))
        counts["train"] = int((~holdout).sum())
        counts["holdout"] = int(holdout.sum())
        return RegionData(
            x=x, y=table.labels, ids=table.ids, holdout=holdout, shard=shard, sensitive=table.sensitive, counts=counts
        )

    def declared_training(self, cfg: ExperimentConfig, schema: Schema) -> int:
        """Training customers as the server may know them; reads the table only if the policy declares none."""
        return declared_training(self.policy, counted=lambda: self.load(cfg, schema).counts["train"])

    def declared_shard(self, cfg: ExperimentConfig, schema: Schema) -> int:
        """Each shard's training customers as the server may know them (the declared size over S)."""
        return declared_shard_size(declared=self.declared_training(cfg, schema), shards=cfg.unlearning.shards)

    # -- training ----------------------------------------------------------------------------------

    @property
    def delta(self) -> float:
        """δ of every release of this region's data: the policy's, never the run's."""
        return self.policy.delta

    def planned_release(
        self, cfg: ExperimentConfig, *, n: int, run_id: str | None = None, shard: int = 0
    ) -> GaussianRelease:
        """One round's DP-SGD release on ``n`` customers: σ, the sampling rate q and the steps per round.

        ``n`` is the region's declared (public) training size: q and the steps are functions of it. σ is
        planned once for the whole run (rounds × local epochs) so the run ends at its target ε. With
        ``run_id``, a σ this run already planned for the same shard, rate and steps is read back from the
        ledger instead of re-planned: the search over the accountant was most of a round's work on a small
        region (docs/benchmarks.md), and its answer cannot have changed.
        """
        if cfg.privacy.target_epsilon is None:
            raise PolicyError(f"region {self.name}: privacy.target_epsilon is required to plan the noise")
        from fedcrm.training import sampling_plan  # torch's side: see TYPE_CHECKING above

        q, steps_per_round = sampling_plan(n=n, batch_size=cfg.training.batch_size, epochs=cfg.training.local_epochs)
        if run_id is not None:
            for event in self.ledger.events(shard):
                if (event.run_id, event.sample_rate, event.steps, event.delta, event.purpose, event.shards) == (
                    run_id,
                    q,
                    steps_per_round,
                    self.delta,
                    cfg.task,
                    cfg.unlearning.shards,
                ):
                    return GaussianRelease(event.noise_multiplier, q, steps_per_round)
        sigma = plan_noise_multiplier(
            target_epsilon=cfg.privacy.target_epsilon,
            delta=self.delta,
            sample_rate=q,
            # Room for the reserved erasure retrains of this shard (each repeats the run's training).
            steps=steps_per_round * cfg.training.rounds * (1 + cfg.unlearning.reserve_retrains),
            accountant=self.policy.accountant,
        )
        return GaussianRelease(sigma, q, steps_per_round)

    def noise_multiplier(self, cfg: ExperimentConfig, *, n: int, run_id: str | None = None, shard: int = 0) -> float:
        """σ of :meth:`planned_release`: the noise a round on ``n`` declared customers trains with."""
        return self.planned_release(cfg, n=n, run_id=run_id, shard=shard).noise_multiplier

    def train(
        self,
        cfg: ExperimentConfig,
        schema: Schema,
        *,
        weights: Weights,
        shard: int,
        round_: int,
        run_id: str,
    ) -> TrainRelease:
        """One round of local training on ``shard``; raises PolicyError / PrivacyBudgetError to refuse.

        Every refusal and every release that left goes into the region's audit log.
        """
        self.check_request(cfg, schema)  # audits its own refusal
        try:
            return self._train_round(cfg, schema, weights=weights, shard=shard, round_=round_, run_id=run_id)
        except (PolicyError, PrivacyBudgetError) as e:
            self._audit_refusal(e, purpose=cfg.task, run_id=run_id, round=round_, shard=shard)
            raise

    def _release(
        self, cfg: ExperimentConfig, *, n_declared: int, run_id: str, shard: int
    ) -> tuple[Release, DpSgd | None]:
        """What this round releases, as the ledger will record it, and the DP-SGD settings for it."""
        from fedcrm.training import DpSgd  # torch's side: see TYPE_CHECKING above

        if cfg.privacy.mode == "sample_dp":
            release = self.planned_release(cfg, n=n_declared, run_id=run_id, shard=shard)
            self.policy.check_noise(region=self.name, noise_multiplier=release.noise_multiplier)
            return release, DpSgd(noise_multiplier=release.noise_multiplier, clipping_norm=cfg.privacy.clipping_norm)
        if cfg.privacy.mode == "client_dp":
            # The region's whole update, clipped here; the server adds noise σ·C/m to the uniform average of
            # the m updates it aggregates (fedcrm.fl.strategy). One customer can move this region's share by
            # 2C/m (across the C-ball), so the customer sees σ/2, and the ledger charges that
            # (fedcrm.privacy.client_dp). Against the server itself, which sees the clipped update before
            # noising, this protects nothing: ε = ∞, shown as such wherever the ledger's ε is.
            charged = client_dp_release(server_noise_multiplier=cfg.privacy.client_noise_multiplier)
            sigma = charged.noise_multiplier if isinstance(charged, GaussianRelease) else 0.0
            self.policy.check_noise(region=self.name, noise_multiplier=sigma)  # the σ the customer sees
            return charged, None
        return NonPrivateRelease(), None

    def _train_round(
        self,
        cfg: ExperimentConfig,
        schema: Schema,
        *,
        weights: Weights,
        shard: int,
        round_: int,
        run_id: str,
    ) -> TrainRelease:
        # The server's model spec and weights, against the policy's bounds, before the table is opened.
        self.check_model(cfg, schema, constituents=[weights])
        # train() has checked the request against the policy; the sizes checked are the declared ones.
        n_declared = self.declared_shard(cfg, schema)
        check_declared_shard(self.policy, region=self.name, shard=shard, declared=n_declared)
        x, y = self.load(cfg, schema).train_shard(shard)
        release, dp = self._release(cfg, n_declared=n_declared, run_id=run_id, shard=shard)
        shards = cfg.unlearning.shards
        # Write-ahead: the spend is durable before the update can leave the region, and checked against the
        # budget in the same transaction (concurrent rounds cannot all pass one check). A non-private
        # release was allowed by the policy as such: no check.
        event_id = self.ledger.reserve(
            budget=self.policy.privacy_budget if isinstance(release, GaussianRelease) else None,
            accountant=self.policy.accountant,
            shard=shard,
            shards=shards,
            purpose=cfg.task,
            run_id=run_id,
            round=round_,
            release=release,
            delta=self.delta,
            noise=cfg.privacy.noise,
            note=f"mode {cfg.privacy.mode}",
            population=population_label(POPULATION_TRAIN, holdout_fraction=self.policy.holdout_fraction),
        )
        randomness = self._randomness(cfg, event_id)
        from fedcrm.models import build_model, get_weights, set_weights  # torch's side: see TYPE_CHECKING above
        from fedcrm.privacy.clipping import clip_update
        from fedcrm.training import train_locally

        model = build_model(cfg.model, n_features=x.shape[1], seed=0)
        set_weights(model, weights)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                train_locally(
                    model,
                    x=x,
                    y=y,
                    training=cfg.training,
                    dp=dp,
                    randomness=randomness,
                    proximal_mu=cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
                    planned_customers=n_declared,
                )
        except BaseException as e:
            self.ledger.mark_outcome(event_id, "not_sent", reason=f"training failed: {e}")
            raise
        new_weights = get_weights(model)
        if cfg.privacy.mode == "client_dp":
            new_weights = clip_update(new_weights, start=weights, norm=cfg.privacy.clipping_norm)
        self.ledger.mark_outcome(event_id, "sent")
        epsilon = self.ledger.epsilon(delta=self.delta, accountant=self.policy.accountant)
        self._audit_spent(
            cfg,
            run_id=run_id,
            event_id=event_id,
            epsilon=epsilon,
            round=round_,
            shard=shard,
            shards=shards,
            mode=cfg.privacy.mode,
            customers=len(x),
            declared_customers=n_declared,
            **(
                {
                    "noise_multiplier": release.noise_multiplier,
                    "sample_rate": release.sample_rate,
                    "steps": release.steps,
                }
                if isinstance(release, GaussianRelease)
                else {}
            ),
        )
        return TrainRelease(
            weights=new_weights,
            weight=1.0 if cfg.privacy.mode == "client_dp" else float(n_declared),
            noise_multiplier=dp.noise_multiplier if dp else 0.0,
            epsilon=epsilon,
            budget=self.policy.privacy_budget,
        )

    def epsilon(self, cfg: ExperimentConfig) -> float:
        return self.ledger.epsilon(delta=self.delta, accountant=self.policy.accountant)

    def _randomness(self, cfg: ExperimentConfig, event_id: int) -> ReleaseRandomness:
        from fedcrm.privacy.randomness import ReleaseRandomness  # torch's side: see TYPE_CHECKING above

        if cfg.privacy.noise == NOISE_REPRODUCIBLE:
            return ReleaseRandomness.reproducible(
                region_secret=region_secret(self.settings.state_dir), nonce=self.ledger.nonce(event_id)
            )
        return ReleaseRandomness.secure()

    def describe(self, cfg: ExperimentConfig, schema: Schema) -> RegionProfile:
        """What the server learns before a run (:class:`RegionProfile`): declared figures only.

        With ``declared_customers`` in the policy no row is read; else one rounded count is. The exact
        counts, where read, go to the region's audit log.
        """
        counts: dict[str, object] = {}

        def counted() -> int:
            data = self.load(cfg, schema)
            counts["counts"] = data.counts
            counts["shard_sizes"] = [
                int((~data.holdout & (data.shard == k)).sum()) for k in range(cfg.unlearning.shards)
            ]
            return data.counts["train"]

        declared = declared_training(self.policy, counted=counted)
        self.audit.append(
            actor=node_actor(self.name),
            action=AuditAction.PREFLIGHT,
            details={"purpose": cfg.task, "config_sha256": cfg.digest(), "declared_customers": declared, **counts},
        )
        return RegionProfile(
            declared_customers=float(declared),
            smallest_shard=float(declared_shard_size(declared=declared, shards=cfg.unlearning.shards)),
            budget=self.policy.privacy_budget,
            delta=self.delta,
            min_customers=self.policy.min_customers,
            features=FeatureEncoder(self.owned_schema(schema)).n_features,  # the owner's encoding
        )
