"""The region's policy: the data owner's last word on what their data may be used for.

A policy lives on the data owner's side, next to the data. A run that asks for more than the policy
allows is refused by that region with a specific reason; the federation goes on without it or stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcrm.errors import PolicyError
from fedcrm.yamlio import load_yaml_model

DEFAULT_BUDGET = 10.0


class RegionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_purposes: tuple[str, ...] | None = Field(None, description="None: every purpose the schema declares")
    allowed_columns: tuple[str, ...] | None = Field(None, description="None: every column the schema declares")
    denied_columns: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="purpose -> columns not allowed for that purpose"
    )
    privacy_budget: float = Field(DEFAULT_BUDGET, gt=0, description="total ε this region's data may spend")
    min_customers: int = Field(20, ge=1, description="fewest customers behind any reported metric")
    required_privacy: Literal["any", "sample_dp", "client_dp"] = "any"
    min_noise_multiplier: float = Field(0.0, ge=0)
    erasure_deadline_days: int = Field(30, ge=1, description="days to serve an erasure (GDPR Art. 12(3))")

    def check_request(
        self, *, region: str, purpose: str, columns: list[str], privacy_mode: str
    ) -> None:
        """Raise :class:`PolicyError` with the first reason this region must refuse the request."""
        if self.allowed_purposes is not None and purpose not in self.allowed_purposes:
            raise PolicyError(
                f"region {region}: purpose `{purpose}` is not allowed by the region's policy "
                f"(allowed: {list(self.allowed_purposes)})"
            )
        denied = set(self.denied_columns.get(purpose, ()))
        if self.allowed_columns is not None:
            denied |= set(columns) - set(self.allowed_columns)
        bad = [c for c in columns if c in denied]
        if bad:
            raise PolicyError(
                f"region {region}: column `{bad[0]}` is not allowed for purpose `{purpose}`"
                + (f" (nor {bad[1:]})" if len(bad) > 1 else "")
            )
        if self.required_privacy != "any" and privacy_mode != self.required_privacy:
            raise PolicyError(
                f"region {region}: the policy requires privacy mode `{self.required_privacy}`, "
                f"the run asks for `{privacy_mode}`"
            )

    def check_noise(self, *, region: str, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyError(
                f"region {region}: the planned noise multiplier {noise_multiplier:.3f} is below the "
                f"policy's floor {self.min_noise_multiplier:g} (ask for a smaller ε or more customers per step)"
            )


def load_policy(path: str | Path | None, *, default_budget: float | None = None) -> RegionPolicy:
    if path:
        return load_yaml_model(RegionPolicy, Path(path))
    return RegionPolicy(privacy_budget=default_budget or DEFAULT_BUDGET)
