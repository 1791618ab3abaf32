"""Synthetic multi-region CRM tables with a known answer: the demo's data and the scale tests' data.

Real CRM tables cannot be shared, and a model trained on them cannot be checked against the truth.
Here the truth is written down: every label is drawn from a logistic model whose coefficients are
saved in ``ground_truth.json``, so tests can ask whether a federated, private model recovers what
generated the data. Regions differ the way real ones do (feature distributions, plan mix, baseline
churn rate, consent rates), because a federation of identical regions would hide the hard part.
The tables also carry the defects a real export has, at low rates, so loading and encoding code
meets them on every run instead of first in production.

The columns are declared in ``configs/schemas/synthetic_crm.yaml``; a test keeps the two in step.

Each region's table depends only on ``(seed, region name, rows)``: region ``eu-west`` is the same
whether generated alone or among a hundred others, which keeps small tests and scale runs comparable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcrm.errors import ConfigError

SCHEMA_NAME = "synthetic_crm"
MANIFEST_FILE = "manifest.json"
GROUND_TRUTH_FILE = "ground_truth.json"

ID_COLUMN = "customer_id"
LABEL_COLUMN = "churned"
CONSENT_COLUMNS = ("consent_churn", "consent_marketing")
YES, NO = "yes", "no"

# name -> (min, max, log): the schema's declared bounds, which are also the ground truth's units.
NUMERIC: dict[str, tuple[float, float, bool]] = {
    "tenure_months": (0.0, 120.0, False),
    "monthly_spend": (0.0, 500.0, True),
    "support_tickets": (0.0, 50.0, True),
    "logins_last_30d": (0.0, 100.0, False),
    "nps_score": (-100.0, 100.0, False),
    "days_since_last_purchase": (0.0, 730.0, True),
}
# The first entry of each vocabulary is the reference level of the ground-truth model.
CATEGORICAL: dict[str, tuple[str, ...]] = {
    "plan": ("basic", "standard", "premium"),
    "contract": ("month-to-month", "one-year", "two-year"),
    "channel": ("web", "store", "phone", "partner"),
    "payment_method": ("card", "direct_debit", "invoice", "paypal"),
}
BOOLEAN = ("autopay", "paperless", "multi_device")
GENDERS = ("F", "M", "X")
AGE_BOUNDS = (18, 95)

# The true model, in encoded units (see ENCODING). `paperless` and `payment_method=paypal` are zero on
# purpose: a model that finds them predictive is fitting noise.
COEFFICIENTS: dict[str, float] = {
    "tenure_months": -2.5,
    "monthly_spend": 3.0,
    "support_tickets": 3.0,
    "logins_last_30d": -4.0,
    "nps_score": -2.0,
    "days_since_last_purchase": 2.0,
    "plan=standard": -0.3,
    "plan=premium": -0.7,
    "contract=one-year": -0.8,
    "contract=two-year": -1.5,
    "channel=store": -0.2,
    "channel=phone": 0.3,
    "channel=partner": 0.5,
    "payment_method=direct_debit": -0.2,
    "payment_method=invoice": 0.4,
    "payment_method=paypal": 0.0,
    "autopay": -0.5,
    "paperless": 0.0,
    "multi_device": -0.3,
}
ENCODING = {
    "numeric": "(clip(x, min, max) - min) / (max - min)",
    "numeric with log: true": "log1p(clip(x, min, max) - min) / log1p(max - min)",
    "categorical": "one-hot `column=level`; the first vocabulary entry is the reference (no term)",
    "boolean": "1 if true else 0",
}

# Legacy product names and export typos, per true plan: what an old CRM export really contains.
# Every spelling stays unknown after the loader strips cells and compares case-sensitively, so the
# manifest's `unknown_plan_spelling` count equals the loader's `(other)` count for `plan`.
PLAN_MISSPELLINGS: dict[str, tuple[str, str]] = {
    "basic": ("Basic", "bronze"),
    "standard": ("Standard plan", "silver"),
    "premium": ("premium+", "gold"),
}
_PLAN_SPEND_FACTOR = np.array([0.6, 1.0, 1.8])
_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DefectRates:
    """Per-row probabilities of each export defect; ``DefectRates.none()`` gives a clean table."""

    blank_monthly_spend: float = 0.015
    negative_tenure: float = 0.005
    logins_over_max: float = 0.005
    unknown_plan_spelling: float = 0.01

    def __post_init__(self) -> None:
        for name, rate in asdict(self).items():
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"synthetic data: defect rate {name} must be in [0, 1), got {rate}")

    @classmethod
    def none(cls) -> DefectRates:
        return cls(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RegionProfile:
    """What makes a region different: drawn once per region from its own seeded stream."""

    target_churn_rate: float
    tenure_mean: float
    spend_median: float
    ticket_rate: float
    login_mean: float
    nps_mean: float
    purchase_days_mean: float
    age_mean: float
    plan_mix: tuple[float, ...]
    contract_mix: tuple[float, ...]
    channel_mix: tuple[float, ...]
    payment_mix: tuple[float, ...]
    autopay_rate: float
    paperless_rate: float
    multi_device_rate: float
    consent_churn_rate: float
    consent_marketing_rate: float


@dataclass(frozen=True)
class RegionSummary:
    name: str
    file: str
    rows: int
    label_rate: float
    consent_rates: dict[str, float]
    defect_counts: dict[str, int]


@dataclass(frozen=True)
class SynthManifest:
    """What was generated, as written to ``manifest.json``."""

    schema: str
    seed: int
    rows: int
    label_rate: float
    consent_rates: dict[str, float]
    defect_rates: dict[str, float]
    regions: tuple[RegionSummary, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(
    *,
    regions: int | Sequence[str],
    customers: int | Sequence[int],
    seed: int,
    out_dir: Path,
    defects: DefectRates | None = None,
) -> SynthManifest:
    """Write ``<out_dir>/<region>.csv`` per region, ``manifest.json`` and ``ground_truth.json``.

    ``regions`` is a list of names or a count (``region-000``, ...); ``customers`` is one row count for
    every region or one per region. Same arguments give byte-identical files.
    """
    names = _region_names(regions)
    counts = _customer_counts(customers, len(names))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synthetic data: seed must be an integer >= 0, got {seed!r}")
    rates = defects if defects is not None else DefectRates()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)

    summaries: list[RegionSummary] = []
    intercepts: dict[str, float] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for name, n in zip(names, counts, strict=True):
        rng = np.random.default_rng(np.random.SeedSequence([seed, *name.encode("utf-8")]))
        profile = _draw_profile(rng)
        values = _draw_customers(rng, profile=profile, n=n)
        scores = _design(values) @ _coefficient_vector()
        intercept = _solve_intercept(scores, profile.target_churn_rate)
        values[LABEL_COLUMN] = (rng.random(n) < _sigmoid(intercept + scores)).astype(np.int64)
        table, defect_counts = _export(rng, values=values, name=name, rates=rates)
        table.to_csv(out_dir / f"{name}.csv", index=False, float_format="%.2f", na_rep="", lineterminator="\n")
        intercepts[name] = round(intercept, 6)
        profiles[name] = asdict(profile)
        summaries.append(
            RegionSummary(
                name=name,
                file=f"{name}.csv",
                rows=n,
                label_rate=_rate(values[LABEL_COLUMN]),
                consent_rates={c: _rate(values[c]) for c in CONSENT_COLUMNS},
                defect_counts=defect_counts,
            )
        )

    total = sum(counts)
    manifest = SynthManifest(
        schema=SCHEMA_NAME,
        seed=seed,
        rows=total,
        label_rate=round(sum(s.label_rate * s.rows for s in summaries) / total, 6),
        consent_rates={
            c: round(sum(s.consent_rates[c] * s.rows for s in summaries) / total, 6) for c in CONSENT_COLUMNS
        },
        defect_rates=asdict(rates),
        regions=tuple(summaries),
    )
    truth = {
        "schema": SCHEMA_NAME,
        "seed": seed,
        "model": "P(churned = 1) = sigmoid(intercepts[region] + sum(coefficients[term] * x[term]))",
        "encoding": ENCODING,
        "bounds": {k: {"min": lo, "max": hi, "log": log} for k, (lo, hi, log) in NUMERIC.items()},
        "reference_levels": {k: v[0] for k, v in CATEGORICAL.items()},
        "labels_drawn_from": "the true values, before export defects were applied",
        "coefficients": COEFFICIENTS,
        "intercepts": intercepts,
        "region_profiles": profiles,
    }
    _write_json(out_dir / MANIFEST_FILE, manifest.to_dict())
    _write_json(out_dir / GROUND_TRUTH_FILE, truth)
    return manifest


def _region_names(regions: int | Sequence[str]) -> list[str]:
    if isinstance(regions, bool):
        raise ConfigError(f"synthetic data: regions must be a count or a list of names, got {regions!r}")
    if isinstance(regions, int):
        if regions < 1:
            raise ConfigError(f"synthetic data: regions must be >= 1, got {regions}")
        return [f"region-{i:03d}" for i in range(regions)]
    if isinstance(regions, str):
        raise ConfigError(f"synthetic data: regions must be a list of names, got the string {regions!r}")
    names = list(regions)
    if not names:
        raise ConfigError("synthetic data: regions must name at least one region, got an empty list")
    for n in names:
        if not isinstance(n, str) or not _REGION_NAME.match(n):
            raise ConfigError(
                f"synthetic data: region name {n!r} must be letters, digits, '.', '_' or '-' "
                "(it becomes a file name and an id prefix)"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"synthetic data: region names must be unique, got duplicates {dupes}")
    return names


def _customer_counts(customers: int | Sequence[int], n_regions: int) -> list[int]:
    counts = [customers] * n_regions if isinstance(customers, int) else list(customers)
    if len(counts) != n_regions:
        raise ConfigError(
            f"synthetic data: customers must be one count or one per region ({n_regions}), got {len(counts)}"
        )
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"synthetic data: customer counts must be integers >= 1, got {c!r}")
    return counts


def _check_out_dir(out_dir: Path, names: list[str]) -> None:
    """Refuse to mix tables: a stale region file left from an earlier run would be loaded as a region."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"synthetic data: {out_dir} exists and is not a folder")
    if not out_dir.exists():
        return
    stale = sorted(p.name for p in out_dir.glob("*.csv") if p.stem not in set(names))
    if stale:
        raise ConfigError(
            f"synthetic data: {out_dir} already holds other region tables {stale[:5]}; "
            "remove them or choose an empty folder"
        )


def _draw_profile(rng: np.random.Generator) -> RegionProfile:
    def mix(base: Sequence[float]) -> tuple[float, ...]:
        return tuple(round(float(p), 6) for p in _normalise(rng.dirichlet(12.0 * np.asarray(base))))

    def uniform(lo: float, hi: float) -> float:
        return round(float(rng.uniform(lo, hi)), 6)

    return RegionProfile(
        target_churn_rate=uniform(0.18, 0.32),
        tenure_mean=uniform(18.0, 48.0),
        spend_median=uniform(35.0, 90.0),
        ticket_rate=uniform(0.8, 2.5),
        login_mean=uniform(8.0, 25.0),
        nps_mean=uniform(-10.0, 40.0),
        purchase_days_mean=uniform(20.0, 90.0),
        age_mean=uniform(38.0, 52.0),
        plan_mix=mix([0.5, 0.3, 0.2]),
        contract_mix=mix([0.5, 0.3, 0.2]),
        channel_mix=mix([0.4, 0.25, 0.2, 0.15]),
        payment_mix=mix([0.35, 0.3, 0.2, 0.15]),
        autopay_rate=uniform(0.35, 0.7),
        paperless_rate=uniform(0.4, 0.8),
        multi_device_rate=uniform(0.2, 0.5),
        consent_churn_rate=uniform(0.86, 0.94),
        consent_marketing_rate=uniform(0.62, 0.78),
    )


def _draw_customers(rng: np.random.Generator, *, profile: RegionProfile, n: int) -> dict[str, NDArray[Any]]:
    """True attribute values (codes for categoricals, 0/1 for booleans), before any export defect."""
    p = profile
    age = np.clip(np.rint(rng.normal(p.age_mean, 14.0, n)), *AGE_BOUNDS).astype(np.int64)
    # Older customers stay longer, so age reaches churn through tenure only: a fairness report has
    # something to show without age being a feature.
    loyalty = 0.6 + 0.8 * (age - AGE_BOUNDS[0]) / (AGE_BOUNDS[1] - AGE_BOUNDS[0])
    tenure = np.minimum(np.floor(rng.exponential(p.tenure_mean * loyalty)), 120).astype(np.int64)
    plan = _choice(rng, p.plan_mix, n)
    raw_spend = p.spend_median * _PLAN_SPEND_FACTOR[plan] * rng.lognormal(0.0, 0.35, n)
    spend = np.round(np.clip(raw_spend, 1.0, 500.0), 2)
    tickets = np.minimum(rng.poisson(p.ticket_rate, n), 50).astype(np.int64)
    logins = np.minimum(rng.poisson(p.login_mean * rng.lognormal(0.0, 0.5, n)), 100).astype(np.int64)
    # Unhappy customers open tickets: correlated features make recovering the coefficients non-trivial.
    nps = np.clip(np.rint(rng.normal(p.nps_mean - 6.0 * tickets, 30.0)), -100, 100).astype(np.int64)
    days = np.minimum(np.floor(rng.exponential(p.purchase_days_mean, n)), 730).astype(np.int64)
    return {
        "tenure_months": tenure,
        "monthly_spend": spend,
        "support_tickets": tickets,
        "logins_last_30d": logins,
        "nps_score": nps,
        "days_since_last_purchase": days,
        "plan": plan,
        "contract": _choice(rng, p.contract_mix, n),
        "channel": _choice(rng, p.channel_mix, n),
        "payment_method": _choice(rng, p.payment_mix, n),
        "autopay": (rng.random(n) < p.autopay_rate).astype(np.int64),
        "paperless": (rng.random(n) < p.paperless_rate).astype(np.int64),
        "multi_device": (rng.random(n) < p.multi_device_rate).astype(np.int64),
        "gender": _choice(rng, (0.49, 0.49, 0.02), n),
        "age": age,
        "consent_churn": (rng.random(n) < p.consent_churn_rate).astype(np.int64),
        "consent_marketing": (rng.random(n) < p.consent_marketing_rate).astype(np.int64),
    }


def _design(values: dict[str, NDArray[Any]]) -> NDArray[np.float64]:
    """The true values in the ground truth's encoded units, one column per COEFFICIENTS term."""
    cols: list[NDArray[np.float64]] = []
    for term in COEFFICIENTS:
        column, _, level = term.partition("=")
        if column in NUMERIC:
            lo, hi, log = NUMERIC[column]
            x = np.clip(values[column].astype(np.float64), lo, hi) - lo
            cols.append(np.log1p(x) / np.log1p(hi - lo) if log else x / (hi - lo))
        elif level:
            cols.append((values[column] == CATEGORICAL[column].index(level)).astype(np.float64))
        else:
            cols.append(values[column].astype(np.float64))
    return np.column_stack(cols)


def _coefficient_vector() -> NDArray[np.float64]:
    return np.array(list(COEFFICIENTS.values()), dtype=np.float64)


def _solve_intercept(scores: NDArray[np.float64], target: float) -> float:
    """The region intercept whose expected churn rate on these customers is ``target`` (bisection).

    Solving per region, rather than fixing one intercept, keeps every region's baseline near its drawn
    target however its feature mix came out, so the overall rate stays in a realistic range.
    """
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(np.mean(_sigmoid(mid + scores))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _export(
    rng: np.random.Generator, *, values: dict[str, NDArray[Any]], name: str, rates: DefectRates
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The table as a CRM export writes it: spellings, id strings, and the defects of a real export."""
    n = len(values[LABEL_COLUMN])
    hit = {k: rng.random(n) < r for k, r in asdict(rates).items()}
    tenure = np.where(hit["negative_tenure"], -1, values["tenure_months"])
    logins = np.where(hit["logins_over_max"], rng.integers(101, 1000, n), values["logins_last_30d"])
    spend = np.where(hit["blank_monthly_spend"], np.nan, values["monthly_spend"])
    misspelt = np.array([PLAN_MISSPELLINGS[p] for p in CATEGORICAL["plan"]], dtype=object)
    plan = np.where(
        hit["unknown_plan_spelling"],
        misspelt[values["plan"], rng.integers(0, 2, n)],
        _spell(CATEGORICAL["plan"], values["plan"]),
    )
    yes_no = np.array([NO, YES], dtype=object)
    table = pd.DataFrame(
        {
            ID_COLUMN: np.char.add(f"{name}-", np.char.zfill(np.arange(n).astype(str), 7)),
            "tenure_months": tenure,
            "monthly_spend": spend,
            "support_tickets": values["support_tickets"],
            "logins_last_30d": logins,
            "nps_score": values["nps_score"],
            "days_since_last_purchase": values["days_since_last_purchase"],
            "plan": plan,
            **{c: _spell(CATEGORICAL[c], values[c]) for c in ("contract", "channel", "payment_method")},
            **{c: yes_no[values[c]] for c in BOOLEAN},
            "gender": _spell(GENDERS, values["gender"]),
            "age": values["age"],
            **{c: yes_no[values[c]] for c in CONSENT_COLUMNS},
            LABEL_COLUMN: values[LABEL_COLUMN],
        }
    )
    return table, {k: int(v.sum()) for k, v in hit.items()}


def _choice(rng: np.random.Generator, probs: Sequence[float], n: int) -> NDArray[np.int64]:
    # Inverse-CDF on one uniform per row: vectorised, and stable across numpy versions.
    cdf = np.cumsum(_normalise(np.asarray(probs, dtype=np.float64)))
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(np.int64)


def _normalise(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return p / p.sum()


def _spell(vocabulary: Sequence[str], codes: NDArray[Any]) -> NDArray[Any]:
    return np.array(vocabulary, dtype=object)[codes]


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rate(x: NDArray[Any]) -> float:
    return round(float(np.mean(x)), 6)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
