"""The region's policy: the data owner's last word on what their data may be used for.

A policy lives on the data owner's side, next to the data. A run that asks for more than the policy
allows is refused by that region with a specific reason; the federation goes on without it or stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcrm import wire
from fedcrm.errors import PolicyError
from fedcrm.yamlio import load_yaml_model

DEFAULT_BUDGET = 10.0
# δ of every release from the region's data. One fixed value, so the whole history composes at one δ;
# 1e-6 is at most 1/(10·N) for regions up to 100,000 customers, and the region warns above that.
DEFAULT_DELTA = 1e-6
PublicSize = Literal["rounded", "exact"]


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
    evaluations_per_run: int = Field(
        4, ge=0, description="how many evaluation answers one run may ask of this region; then it refuses"
    )
    public_size: PublicSize = Field(
        "rounded", description="what the server may learn of the region's size: rounded to 2 significant digits"
    )
    erasure_deadline_days: int = Field(30, ge=1, description="days to serve an erasure (GDPR Art. 12(3))")
    # Bounds on the model the server sends (fedcrm.model_limits), checked before a customer row is read.
    max_weight_abs: float = Field(
        1e3,
        gt=0,
        description="largest |weight| accepted from the server (trained models here stay under 4; non-finite refused)",
    )
    max_parameters: int = Field(
        1_000_000, ge=1, description="largest model, in parameters, the server may ask this region to build"
    )

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

    def check_noise(self, *, region: str, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyError(
                f"region {region}: the planned noise multiplier {noise_multiplier:.3f} is below the "
                f"policy's floor {self.min_noise_multiplier:g} (ask for a smaller ε or more customers per step)",
                code=wire.REFUSED_NOISE,
            )

    def declared_size(self, n: int) -> int:
        """A count as the policy lets the server learn it: the sampling rate and steps are planned from it.

        ``rounded`` (2 significant digits) hides small changes: one erasure or withdrawal moves it only
        when the count crosses a rounding boundary. The policy declares this figure public.
        """
        if self.public_size == "exact" or n < 100:
            return n
        return int(round(n, -(len(str(n)) - 2)))


def load_policy(path: str | Path | None, *, default_budget: float | None = None) -> RegionPolicy:
    """The region's policy file; without one, the defaults: sample-level DP required, δ = 1e-6."""
    if path:
        return load_yaml_model(RegionPolicy, Path(path))
    return RegionPolicy(privacy_budget=default_budget or DEFAULT_BUDGET)
