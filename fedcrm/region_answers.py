"""What a region answers about its hold-out: DP aggregates, metered and charged to its ledger.

Every answer (the served model's evaluation, fairness and importance) is one Gaussian mechanism on the
hold-out population: refused past the policy's daily allowance or the hold-out's budget, checked and
recorded in the ledger in one transaction (write-ahead) and in the audit log before it leaves.
:class:`HoldoutAnswers` is the part of :class:`fedcrm.region.Region` that gives them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcrm.config import ExperimentConfig
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import Schema
from fedcrm.evaluation.metrics import ScoreSummary
from fedcrm.evaluation.trust import TrustSummary
from fedcrm.governance.audit_log import AuditAction
from fedcrm.governance.audit_trail import finite, node_actor
from fedcrm.governance.customer_refs import RegionAuditLog
from fedcrm.governance.policy import RegionPolicy
from fedcrm.model_limits import check_weights
from fedcrm.privacy.accountant import GaussianRelease
from fedcrm.privacy.aggregates import ANSWER_BINS, ANSWER_LOGIT_RANGE, LOSS_CAP, noised, sensitivity
from fedcrm.privacy.ledger import (
    MECHANISM_GAUSSIAN,
    POPULATION_HOLDOUT,
    DailyAllowance,
    PrivacyLedger,
    population_label,
)
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.region_data import RegionData

Weights = dict[str, np.ndarray]

# The evaluation answer: one customer moves one histogram bin and at most 1 in each of three scaled sums.
EVALUATION_COORDINATES = 4
# The score a customer gets in an answer when the served model's output for them is not finite (weights
# the server chose can make it NaN for exactly the customers it targets): a constant, so that the answer
# keeps its shape, raises nothing, and that customer moves one bin like any other.
NONFINITE_SCORE = 0.5


def finite_scores(scores: np.ndarray) -> np.ndarray:
    """``scores`` with every non-finite entry replaced by :data:`NONFINITE_SCORE`."""
    return np.where(np.isfinite(scores), scores, NONFINITE_SCORE)


class HoldoutAnswers:
    """The hold-out answers of a region; the region provides its name, policy, ledger, audit log, data
    and the randomness of a release."""

    name: str
    policy: RegionPolicy
    ledger: PrivacyLedger
    audit: RegionAuditLog

    @property
    def delta(self) -> float:
        raise NotImplementedError

    def load(self, cfg: ExperimentConfig, schema: Schema) -> RegionData:
        raise NotImplementedError

    def epsilon(self, cfg: ExperimentConfig) -> float:
        raise NotImplementedError

    def _randomness(self, cfg: ExperimentConfig, event_id: int) -> ReleaseRandomness:
        raise NotImplementedError

    def _answer(
        self, cfg: ExperimentConfig, *, run_id: str, what: str, parts: dict[str, Any], coordinates: int
    ) -> dict[str, np.ndarray]:
        """Release ``parts`` (scaled so one customer moves a coordinate by at most 1) as one Gaussian answer.

        Refused when the region has given the policy's answers of the day (UTC, over every run: the run id
        is the server's) or the hold-out's budget would be exceeded; the count, the budget check and the
        write-ahead record of a Gaussian mechanism on the hold-out are one ledger transaction.
        """
        answers, source = self.policy.evaluation_allowance
        release = GaussianRelease(self.policy.evaluation_noise, 1.0, 1)
        event_id = self.ledger.reserve(
            budget=self.policy.privacy_budget,
            accountant=self.policy.accountant,
            allowance=DailyAllowance(answers=answers, source=source),
            shard=0,
            purpose=cfg.task,
            run_id=run_id,
            round=0,
            release=release,
            delta=self.delta,
            noise=cfg.privacy.noise,
            note=what,
            mechanism=MECHANISM_GAUSSIAN,
            population=population_label(POPULATION_HOLDOUT, holdout_fraction=self.policy.holdout_fraction),
        )
        answer = noised(
            parts,
            coordinates_per_customer=coordinates,
            noise_multiplier=self.policy.evaluation_noise,
            randomness=self._randomness(cfg, event_id),
        )
        self.ledger.mark_outcome(event_id, "sent")
        # An answer spends the hold-out's budget like a round spends a shard's: the data owner's log must
        # show it, or its last ε would understate the region's (the worst-off customer may be in the hold-out).
        self._audit_spent(
            cfg,
            run_id=run_id,
            event_id=event_id,
            epsilon=self.epsilon(cfg),
            round=0,
            answer=what,
            mechanism=MECHANISM_GAUSSIAN,
            noise_multiplier=self.policy.evaluation_noise,
        )
        return answer

    def _audit_spent(
        self, cfg: ExperimentConfig, *, run_id: str, event_id: int, epsilon: float, **details: Any
    ) -> None:
        """A release that left, in the data owner's audit log: what it spent and the region's ε after it."""
        self.audit.append(
            actor=node_actor(self.name),
            action=AuditAction.PRIVACY_SPENT,
            details=finite(
                {
                    "run_id": run_id,
                    "purpose": cfg.task,
                    "ledger_event": event_id,
                    "delta": self.delta,
                    "noise": cfg.privacy.noise,
                    "epsilon_spent_total": epsilon,
                    "budget": self.policy.privacy_budget,
                    **details,
                }
            ),
        )

    def answer_noise_std(self, *, coordinates: int) -> float:
        """The std of the noise on each count of an answer (public: the policy's σ and the answer's form)."""
        return self.policy.evaluation_noise * sensitivity(coordinates)

    def check_model(self, cfg: ExperimentConfig, schema: Schema, *, constituents: list[Weights]) -> None:
        """Refuse the server's model spec and weights against the policy's bounds (fedcrm.model_limits).

        From the schema's width alone: called before any customer row is read.
        """
        check_weights(
            self.policy,
            region=self.name,
            spec=cfg.model,
            n_features=FeatureEncoder(schema).n_features,
            constituents=constituents,
        )

    def _holdout_models(
        self, cfg: ExperimentConfig, schema: Schema, constituents: list[Weights]
    ) -> tuple[RegionData, list[Any]]:
        self.check_model(cfg, schema, constituents=constituents)  # before the table is opened
        # torch is for a model to answer on: loading a region's customers (a data owner's commands) needs none.
        from fedcrm.models import build_model, set_weights

        data = self.load(cfg, schema)
        models = []
        for w in constituents:
            m = build_model(cfg.model, n_features=data.x.shape[1], seed=0)
            set_weights(m, w)
            models.append(m)
        return data, models

    def evaluate(
        self, cfg: ExperimentConfig, schema: Schema, *, constituents: list[Weights], run_id: str
    ) -> ScoreSummary:
        """The served model (mean of constituents) on the hold-out, as a DP answer charged to the ledger."""
        from fedcrm.models import ensemble_proba  # see _holdout_models

        data, models = self._holdout_models(cfg, schema, constituents)
        x, y = data.x[data.holdout], data.y[data.holdout]
        scores = finite_scores(ensemble_proba(models, x)) if len(x) else np.zeros(0)
        exact = ScoreSummary.of(
            scores=scores, labels=y, bins=ANSWER_BINS, loss_cap=LOSS_CAP, logit_range=ANSWER_LOGIT_RANGE
        )
        answer = self._answer(
            cfg,
            run_id=run_id,
            what="evaluation",
            coordinates=EVALUATION_COORDINATES,
            parts={
                "hist_pos": exact.hist_pos,
                "hist_neg": exact.hist_neg,
                "log_loss": exact.sum_log_loss / LOSS_CAP,
                "brier": exact.sum_brier,
                "correct": exact.correct,
            },
        )
        return ScoreSummary(
            hist_pos=answer["hist_pos"],
            hist_neg=answer["hist_neg"],
            sum_log_loss=float(answer["log_loss"]) * LOSS_CAP,
            sum_brier=float(answer["brier"]),
            correct=float(answer["correct"]),
        )

    def trust_summary(
        self, cfg: ExperimentConfig, schema: Schema, *, constituents: list[Weights], run_id: str
    ) -> TrustSummary:
        """Fairness histograms per sensitive group and summed |contributions| per column on the hold-out,
        as one DP answer: the noise, not suppression by exact counts, protects small groups."""
        from fedcrm.evaluation.explain import importance_sums
        from fedcrm.evaluation.fairness import GroupHistograms, summarise_groups
        from fedcrm.models import ensemble_proba  # see _holdout_models

        data, models = self._holdout_models(cfg, schema, constituents)
        x, y = data.x[data.holdout], data.y[data.holdout]
        sensitive = data.sensitive.iloc[np.flatnonzero(data.holdout)].reset_index(drop=True)
        groups = summarise_groups(
            scores=finite_scores(ensemble_proba(models, x)),
            labels=y,
            sensitive=sensitive,
            schema=schema,
            min_customers=1,
        )
        parts: dict[str, Any] = {"importance": importance_sums(models, schema=schema, x=x), "customers": len(x)}
        for attribute, h in groups.items():
            parts |= {f"{attribute}/pos": h.hist_pos, f"{attribute}/neg": h.hist_neg, f"{attribute}/score": h.sum_score}
        # One customer: per attribute one histogram bin and one score (≤ 1); an importance row of norm ≤ 1; 1.
        answer = self._answer(
            cfg, run_id=run_id, what="fairness and importance", parts=parts, coordinates=2 * len(groups) + 2
        )
        noisy = {
            attribute: GroupHistograms(
                hist_pos=answer[f"{attribute}/pos"],
                hist_neg=answer[f"{attribute}/neg"],
                sum_score=answer[f"{attribute}/score"],
                suppressed=h.suppressed,
            )
            for attribute, h in groups.items()
        }
        return TrustSummary(groups=noisy, importance_sum=answer["importance"], customers=float(answer["customers"]))  # type: ignore[arg-type]
