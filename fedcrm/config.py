"""The experiment config: typed, validated once at load, unknown keys rejected.

Errors name the file and the key: ``configs/churn.yaml: `privacy.target_epsilon`: Input should be
greater than 0, got -1``. Relative paths in a config are relative to the config file's folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcrm.errors import ConfigError
from fedcrm.yamlio import read_yaml_mapping, validate_mapping

# Settings fedcrm once accepted but never read: each region's policy decides them. A config that sets
# one is refused with the reason, so that nobody believes it changes anything.
REMOVED_SETTINGS: dict[str, str] = {
    "budget": "the region's policy decides this (`privacy_budget` in the data owner's policy file)",
    "evaluation.min_customers": "the region's policy decides this (`min_customers` in the data owner's policy file)",
}

# Data path of a region named without one (``regions: [eu, us]``): set by the data owner's node config.
NODE_PATH_PLACEHOLDER = "<node-config>"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    kind: Literal["logistic", "mlp"] = "mlp"
    hidden: tuple[int, ...] = (64, 64)


class TrainingConfig(_Section):
    rounds: int = Field(10, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(256, ge=1, description="expected batch size under Poisson sampling")
    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: float = Field(0.01, gt=0)


class PrivacyConfig(_Section):
    mode: Literal["none", "sample_dp", "client_dp"] = "sample_dp"
    target_epsilon: float | None = Field(3.0, gt=0, description="per region, over the whole run")
    delta: float | None = Field(
        None, gt=0, lt=1, description="leave out: each region's policy fixes δ; a different value is refused"
    )
    # secure: fresh keys from the OS for every release; reproducible: keys the region derives from its
    # secret (research and tests; only where the region's policy allows it). See fedcrm.privacy.randomness.
    noise: Literal["secure", "reproducible"] = "secure"
    clipping_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="must be each region's: a region whose policy names another accountant refuses the run"
    )
    # client_dp only: the Gaussian noise multiplier of Flower's DP-FedAvg wrapper.
    # Each customer is charged σ/2: their removal moves their region's clipped update by up to 2C.
    client_noise_multiplier: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.mode == "sample_dp" and self.target_epsilon is None:
            raise ValueError("privacy.target_epsilon is required when privacy.mode is sample_dp")
        return self


class FederationConfig(_Section):
    strategy: Literal["fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    trimmed_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="fedtrimmedavg: share of regions cut at each end, per coordinate"
    )
    hostile_regions: int = Field(1, ge=0, description="krum: how many regions may send hostile updates")
    fraction_train: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the regions taking part that each round trains (Flower's "
        "FedAvg parameter): int(regions × fraction_train), at least min_regions, drawn at random by the server. "
        "Only the regions drawn train and are charged. The server knows whom it drew, so this sampling gives "
        "the customers no privacy amplification and no accountant counts it; each region still plans σ for "
        "all training.rounds, so a region drawn in fewer rounds ends below its target ε (conservative)",
    )
    min_regions: int = Field(1, ge=1, description="fewest regions a round may aggregate")
    round_timeout_s: float = Field(600.0, gt=0)
    wait_for_regions_s: float = Field(
        0.0,
        ge=0,
        description="before each round, wait up to this long for every region that passed pre-flight "
        "to be connected (a SuperNode restarted after a crash rejoins); 0: start with the regions connected now. "
        "A region still missing is named in the round's `failed` events",
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="reject an update that moves the model farther than this (L2 norm of the change)"
    )
    outlier_norm_ratio: float | None = Field(
        10.0, gt=1, description="reject an update whose change is this many times the round's median (3+ regions)"
    )


class EvaluationConfig(_Section):
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="must equal each region's policy (the region's hold-out is its own)"
    )
    every_round: bool = Field(
        False,
        description="evaluate the global model on the hold-outs after every round, not only at the end: "
        "each answer is a DP release charged to the regions' hold-out budgets and counted in their allowance",
    )


class TrackingConfig(_Section):
    """Optional experiment tracking (server side only). mlflow: uri None = a file store in the run folder."""

    kind: Literal["none", "mlflow"] = "none"
    uri: str | None = None
    experiment: str | None = None


class UnlearningConfig(_Section):
    shards: int = Field(1, ge=1, le=64)
    slices: int = Field(1, ge=1, le=64)
    reserve_retrains: int = Field(0, ge=0, le=50, description="erasure retrains of any shard σ is planned to fit")

    @field_validator("slices")
    @classmethod
    def _no_slicing_yet(cls, slices: int) -> int:
        if slices != 1:
            # See docs/erasure.md: for these model sizes a retrain is dominated by fixed per-round costs,
            # so restarting from a mid-shard checkpoint would save little; not implemented.
            raise ValueError(
                f"unlearning.slices = {slices} is not supported yet (SISA slicing); use slices: 1 and "
                "more shards (unlearning.shards) to make erasures cheaper"
            )
        return slices


class SplitConfig(_Section):
    """Simulation convenience: make the regions by splitting one table (``fedcrm data split``)."""

    input: Path
    regions: tuple[str, ...] = Field(min_length=1)
    by: str = "hash"
    seed: int = 0


class ExperimentConfig(_Section):
    name: str
    task: Literal["churn", "propensity"]
    schema_path: Path = Field(alias="schema")
    regions: dict[str, Path] = Field(default_factory=dict, description="region name -> its data file (simulation)")
    region_delimiters: dict[str, str] = Field(
        default_factory=dict,
        description="region name -> its CSV file's delimiter, from `regions: {eu: {path: ..., delimiter: ';'}}`",
    )
    split: SplitConfig | None = None
    policies: dict[str, Path] = Field(
        default_factory=dict, description="simulation only: region name -> that data owner's policy file"
    )
    region_schemas: dict[str, Path] = Field(
        default_factory=dict,
        description="simulation only: region name -> the schema file that data owner declares (default: `schema`); "
        "each region checks the run's schema against its own and refuses a run whose schema differs",
    )
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    unlearning: UnlearningConfig = UnlearningConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
    output_dir: Path = Path("runs")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _region_entries(cls, data: Any) -> Any:
        """``regions: {eu: {path: eu.csv, delimiter: ";"}}``: the file and its delimiter (a data owner's
        spreadsheet export); the plain ``eu: eu.csv`` form stays. Delimiters go to ``region_delimiters``."""
        if not isinstance(data, dict) or not isinstance(data.get("regions"), dict):
            return data
        paths: dict[str, Any] = {}
        delimiters = dict(data.get("region_delimiters") or {})
        for name, entry in data["regions"].items():
            if not isinstance(entry, dict):
                paths[name] = entry
                continue
            unknown = sorted(set(entry) - {"path", "delimiter"})
            if unknown or "path" not in entry:
                raise ValueError(
                    f"regions.{name}: expected a data file path or {{path: ..., delimiter: ...}}, "
                    f"found keys {sorted(entry)}"
                )
            paths[name] = entry["path"]
            if entry.get("delimiter") is not None:
                delimiters[name] = entry["delimiter"]
        bad = {r: d for r, d in delimiters.items() if not (isinstance(d, str) and len(d) == 1 and d not in '"\r\n')}
        if bad:
            raise ValueError(f"regions: a delimiter is one character (e.g. ';' or a tab), found {bad}")
        return {**data, "regions": paths, "region_delimiters": delimiters}

    @field_validator("regions", mode="before")
    @classmethod
    def _names_only(cls, value: Any) -> Any:
        """Deployment: ``regions: [eu, us]`` names the regions; each one's file is set on its own node."""
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("a list of regions must hold region names only")
            return {name: Path(f"{NODE_PATH_PLACEHOLDER}/{name}") for name in value}
        return value

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if not self.regions and self.split is None:
            raise ValueError("give `regions` (name -> data file) or `split` (one table split into regions)")
        if self.split is not None and not self.regions:
            # Placeholder paths until the split is made; see fedcrm.experiment.materialise_regions.
            object.__setattr__(self, "regions", {r: Path(f"<split>/{r}.csv") for r in self.split.regions})
        unknown = sorted(set(self.policies) - set(self.regions))
        if unknown:
            raise ValueError(f"policies given for unknown regions {unknown}")
        unknown = sorted(set(self.region_schemas) - set(self.regions))
        if unknown:
            raise ValueError(f"region_schemas given for unknown regions {unknown}")
        unknown = sorted(set(self.region_delimiters) - set(self.regions))
        if unknown:
            raise ValueError(f"region_delimiters given for unknown regions {unknown}")
        bad = [r for r in self.regions if not r.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"region names must be letters, digits, - or _, got {bad}")
        if self.privacy.mode == "client_dp" and self.federation.strategy != "fedavg":
            raise ValueError(
                f"privacy.mode client_dp needs federation.strategy fedavg (uniform average of clipped updates, "
                f"sensitivity C/m), got {self.federation.strategy}: robust rules break that sensitivity"
            )
        if self.federation.min_regions > len(self.regions):
            raise ValueError(
                f"federation.min_regions is {self.federation.min_regions} but only {len(self.regions)} regions"
            )
        return self

    def resolved(self, base: Path) -> ExperimentConfig:
        """Paths made absolute against ``base`` (the config file's folder)."""

        def fix(p: Path) -> Path:
            if p.parts and p.parts[0] == NODE_PATH_PLACEHOLDER:
                return p  # a region named without a path (deployment): its data owner sets the file
            return p if p.is_absolute() else (base / p).resolve()

        update: dict[str, Any] = {"schema_path": fix(self.schema_path), "output_dir": fix(self.output_dir)}
        update["policies"] = {k: fix(v) for k, v in self.policies.items()}
        update["region_schemas"] = {k: fix(v) for k, v in self.region_schemas.items()}
        if self.split is None:
            update["regions"] = {k: fix(v) for k, v in self.regions.items()}
        else:
            update["split"] = self.split.model_copy(update={"input": fix(self.split.input)})
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(by_alias=True))

    def digest(self) -> str:
        """Hash of what the config sets: a setting added to fedcrm later (at its default) keeps old digests."""
        explicit = json.loads(self.model_dump_json(by_alias=True, exclude_defaults=True))
        return hashlib.sha256(json.dumps(explicit, sort_keys=True).encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, Any], *, source: str = "<overrides>") -> ExperimentConfig:
        """A copy with dotted keys replaced (``{"privacy.target_epsilon": 1.0}``), validated again."""
        raw = self.to_dict()
        for key, value in overrides.items():
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"{source}: unknown key `{key}`")
                node = node[p]
            if key in REMOVED_SETTINGS:
                raise _removed_setting(key, source=source)
            if leaf not in node:
                raise ConfigError(f"{source}: unknown key `{key}`")
            node[leaf] = value
        return validate_mapping(ExperimentConfig, raw, source=source)


def _removed_setting(key: str, *, source: str) -> ConfigError:
    return ConfigError(f"{source}: `{key}` is no longer a setting: {REMOVED_SETTINGS[key]}; remove it from the config")


def _removed_settings_in(raw: dict[str, Any]) -> list[str]:
    found = []
    for key in REMOVED_SETTINGS:
        *parents, leaf = key.split(".")
        node: Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            found.append(key)
    return found


def without_removed_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A config fedcrm wrote into a run folder, less the settings it wrote then but never read.

    Run folders made before those settings were removed hold them at their old defaults; the run was
    trained without them either way, so dropping them changes nothing.
    """
    out = copy.deepcopy(raw)
    for key in _removed_settings_in(out):
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        del node[leaf]
    return out


def load_config(path: str | Path) -> ExperimentConfig:
    """Load, validate and resolve an experiment config file."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    removed = _removed_settings_in(raw)
    if removed:
        raise _removed_setting(removed[0], source=str(path))
    return _resolved_config(raw, path=path)


def load_saved_config(path: Path, *, schema_required: bool = True) -> ExperimentConfig:
    """Load the resolved config that ``fedcrm run`` wrote into a run folder (``RUN_DIR/config.yaml``).

    ``schema_required=False`` for a reader that needs no schema (where the run's schema file may be gone).
    """
    return _resolved_config(
        without_removed_settings(read_yaml_mapping(path)), path=path, schema_required=schema_required
    )


def _resolved_config(raw: dict[str, Any], *, path: Path, schema_required: bool = True) -> ExperimentConfig:
    cfg = validate_mapping(ExperimentConfig, raw, source=str(path)).resolved(path.parent.resolve())
    if schema_required and not cfg.schema_path.exists():
        raise ConfigError(f"{path}: `schema`: file {cfg.schema_path} not found")
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
