"""The region's policy: the data owner's last word on what their data may be used for.

A policy lives on the data owner's side, next to the data. A run that asks for more than the policy
allows is refused by that region with a specific reason; the federation goes on without it or stops.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm import wire
from fedcrm.errors import PolicyError
from fedcrm.yamlio import load_yaml_model

DEFAULT_BUDGET = 10.0
# δ of every release from the region's data. One fixed value, so the whole history composes at one δ;
# 1e-6 is at most 1/(10·N) for regions up to 100,000 customers, and the region warns above that.
DEFAULT_DELTA = 1e-6
# Hold-out answers a region gives per UTC day when its policy names no allowance: a final evaluation and
# its fairness answer for a dozen runs.
DEFAULT_EVALUATIONS_PER_DAY = 24
PublicSize = Literal["rounded", "exact"]
# Up to 16 shards: more would make each shard a few dozen customers in a small region, where a shard's
# size and its training update say most about each customer in it.
DEFAULT_ALLOWED_SHARDS = tuple(range(1, 17))


class RegionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_purposes: tuple[str, ...] | None = Field(None, description="None: every purpose the schema declares")
    allowed_columns: tuple[str, ...] | None = Field(None, description="None: every column the schema declares")
    denied_columns: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="purpose -> columns not allowed for that purpose"
    )
    privacy_budget: float = Field(DEFAULT_BUDGET, gt=0, description="total ε this region's data may spend")
    min_customers: int = Field(20, ge=1, description="fewest customers behind any reported metric")
    required_privacy: Literal["any", "sample_dp", "client_dp"] = Field(
        "sample_dp", description="any: either DP mode; training without DP needs allow_non_private as well"
    )
    min_noise_multiplier: float = Field(0.0, ge=0)
    delta: float = Field(DEFAULT_DELTA, gt=0, lt=1e-3, description="δ of every release of this region's data")
    allow_non_private: bool = Field(
        False, description="let runs with privacy.mode none train here: their customers' ε becomes ∞"
    )
    allow_reproducible_noise: bool = Field(
        False, description="let runs ask for privacy.noise reproducible (keys derived from the region's secret)"
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of customers held out for evaluation (chosen by the region's secret)"
    )
    evaluation_noise: float = Field(
        3.0, gt=0, description="noise multiplier of every evaluation answer (Gaussian, × its sensitivity)"
    )
    evaluations_per_run: int | None = Field(
        None, ge=0, description="deprecated since 0.2.0: read as evaluations_per_day (a run id is the server's)"
    )
    public_size: PublicSize = Field(
        "rounded", description="what the server may learn of the region's size: see declared_size (exact: warned)"
    )
    erasure_deadline_days: int = Field(30, ge=1, description="days to serve an erasure (GDPR Art. 12(3))")
    # The accountant that prices every release of this region's data, for its whole ledger. The region's
    # choice, not the run's: PRV reads about 10 % lower than RDP on the same history, so a server free to
    # pick it would move the budget's cap. A run that asks for another is refused (check_request).
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="the accountant the region composes its ledger with (rdp or prv)"
    )
    # What the server may learn of the region's size, and the shard counts it may ask for (0.2.0). Every
    # size the server sees, and every size a refusal compares, is one of these figures, never a count.
    declared_customers: int | None = Field(
        None,
        ge=0,
        description="the data owner's public figure of training customers: with it, sizes never depend on the data",
    )
    size_step: int = Field(
        100, ge=1, description="the coarsest step a size derived from the data is rounded to, at every size"
    )
    allowed_shards: tuple[int, ...] = Field(
        DEFAULT_ALLOWED_SHARDS, min_length=1, description="the shard counts (unlearning.shards) a run may ask for"
    )
    # The evaluation allowance, per window the region owns (issue 23).
    evaluations_per_day: int | None = Field(
        None,
        ge=0,
        description=f"evaluation answers given per UTC day over every run (None: {DEFAULT_EVALUATIONS_PER_DAY}); "
        "then the region refuses until 00:00 UTC",
    )
    # Bounds on the model the server sends (fedcrm.model_limits), checked before a customer row is read.
    max_weight_abs: float = Field(
        1e3,
        gt=0,
        description="largest |weight| accepted from the server (trained models here stay under 4; non-finite refused)",
    )
    max_parameters: int = Field(
        1_000_000, ge=1, description="largest model, in parameters, the server may ask this region to build"
    )

    @model_validator(mode="after")
    def _read_evaluations_per_run(self) -> RegionPolicy:
        # 0.1's allowance was counted per run id, which the server chooses: a new id was a new allowance.
        if self.evaluations_per_run is not None:
            if self.evaluations_per_day is not None:
                raise ValueError(
                    "evaluations_per_run and evaluations_per_day are both set: keep evaluations_per_day only "
                    "(evaluations_per_run is deprecated since 0.2.0)"
                )
            warnings.warn(
                f"the policy's evaluations_per_run ({self.evaluations_per_run}) is deprecated since fedcrm 0.2.0 "
                "and read as evaluations_per_day: a run id is chosen by the server, so a per-run allowance "
                "bounded nothing; rename the field to evaluations_per_day",
                FutureWarning,  # shown by default: the data owner who wrote the policy should read it
                stacklevel=2,
            )
        return self

    @property
    def evaluation_allowance(self) -> tuple[int, str]:
        """Hold-out answers per UTC day, and the policy field that says so."""
        if self.evaluations_per_day is not None:
            return self.evaluations_per_day, "evaluations_per_day"
        if self.evaluations_per_run is not None:
            return self.evaluations_per_run, "evaluations_per_run, read as evaluations_per_day"
        return DEFAULT_EVALUATIONS_PER_DAY, "evaluations_per_day (default)"

    def check_request(
        self,
        *,
        region: str,
        purpose: str,
        columns: list[str],
        privacy_mode: str,
        noise: str = "secure",
        delta: float | None = None,
        holdout_fraction: float | None = None,
        label: str | None = None,
        accountant: str | None = None,
    ) -> None:
        """Raise :class:`PolicyError` with the first reason this region must refuse the request."""
        if self.allowed_purposes is not None and purpose not in self.allowed_purposes:
            raise PolicyError(
                f"region {region}: purpose `{purpose}` is not allowed by the region's policy "
                f"(allowed: {list(self.allowed_purposes)})",
                code=wire.REFUSED_PURPOSE,
            )
        denied = set(self.denied_columns.get(purpose, ()))
        if self.allowed_columns is not None:
            denied |= set(columns) - set(self.allowed_columns)
        bad = [c for c in columns if c in denied]
        if bad:
            raise PolicyError(
                f"region {region}: column `{bad[0]}` is not allowed for purpose `{purpose}`"
                + (f" (nor {bad[1:]})" if len(bad) > 1 else ""),
                code=wire.REFUSED_COLUMN,
            )
        if label is not None and label in self.denied_columns.get(purpose, ()):
            # A label is a column the model learns to predict: denying a column denies it as a label too.
            raise PolicyError(
                f"region {region}: column `{label}` is denied for purpose `{purpose}`, as a label as much as a feature",
                code=wire.REFUSED_COLUMN,
            )
        if privacy_mode == "none":
            if not self.allow_non_private:
                raise PolicyError(
                    f"region {region}: the run asks for privacy mode `none` (no DP), and the region's policy "
                    "does not allow it (allow_non_private: false)"
                )
        elif self.required_privacy != "any" and privacy_mode != self.required_privacy:
            raise PolicyError(
                f"region {region}: the policy requires privacy mode `{self.required_privacy}`, "
                f"the run asks for `{privacy_mode}`",
                code=wire.REFUSED_PRIVACY_MODE,
            )
        if noise == "reproducible" and not self.allow_reproducible_noise:
            raise PolicyError(
                f"region {region}: the run asks for privacy.noise `reproducible`, and the region's policy does "
                "not allow it (allow_reproducible_noise: false); leave privacy.noise at `secure`"
            )
        if holdout_fraction is not None and holdout_fraction != self.holdout_fraction:
            raise PolicyError(
                f"region {region}: the hold-out is the region's: its policy fixes holdout_fraction = "
                f"{self.holdout_fraction:g}, the run asks for evaluation.holdout_fraction = {holdout_fraction:g}"
            )
        if delta is not None and delta != self.delta:
            raise PolicyError(
                f"region {region}: δ is the region's: its policy fixes δ = {self.delta:g}, the run asks for "
                f"privacy.delta = {delta:g}; leave privacy.delta out of the config"
            )
        if accountant is not None and accountant != self.accountant:
            raise PolicyError(
                f"region {region}: the accountant is the region's: its policy composes its ledger with "
                f"`{self.accountant}`, the run asks for privacy.accountant = `{accountant}`"
            )

    def check_noise(self, *, region: str, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyError(
                f"region {region}: the planned noise multiplier {noise_multiplier:.3f} is below the "
                f"policy's floor {self.min_noise_multiplier:g} (ask for a smaller ε or more customers per step)",
                code=wire.REFUSED_NOISE,
            )

    def declared_size(self, n: int) -> int:
        """A count as the policy lets the server learn it: the sampling rate and steps are planned from it.

        ``rounded``: 2 significant digits, and never finer than ``size_step`` at any size, so a small
        count is as coarse as a large one (37 customers read 0, 987 read 1,000). One erasure or
        withdrawal moves the figure only when the count crosses the middle of a step, at most once in
        ``size_step`` erasures; a size the owner declares (``declared_customers``) never moves.
        ``exact`` is the owner's explicit choice to publish the count (the region warns about it).
        """
        if self.public_size == "exact":
            return n
        step = max(self.size_step, 10 ** max(0, len(str(n)) - 2))
        return round(n / step) * step

    def check_shards(self, *, region: str, shards: int) -> None:
        """Refuse, from the run's plan alone, a shard count the policy does not allow."""
        if shards not in self.allowed_shards:
            raise PolicyError(
                f"region {region}: the run asks for {shards} shards (unlearning.shards); the region's policy "
                f"allows {list(self.allowed_shards)} (allowed_shards)",
                code=wire.REFUSED_SHARDS,
            )


def load_policy(path: str | Path | None, *, default_budget: float | None = None) -> RegionPolicy:
    """The region's policy file; without one, the defaults: sample-level DP required, δ = 1e-6."""
    if path:
        return load_yaml_model(RegionPolicy, Path(path))
    return RegionPolicy(privacy_budget=default_budget or DEFAULT_BUDGET)
