"""Declared schemas: the public facts about a customer table, and the only way data enters fedcrm.

A schema says which column identifies a customer, which is the label, and for every feature its type
and *public* encoding facts (numeric bounds, category vocabularies, boolean spellings). Encoders are
built from these declarations alone, never from statistics of the data, so every region encodes the
same way without exchanging anything and no customer value leaks through normalisation constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.errors import ConfigError
from fedcrm.yamlio import load_yaml_model

MissingPolicy = Literal["drop", "fill", "indicator", "error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericColumn(_Strict):
    name: str
    type: Literal["numeric"]
    min: float
    max: float
    log: bool = False
    missing: MissingPolicy = "error"
    fill: float | None = None
    missing_spellings: tuple[str, ...] = ("",)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> NumericColumn:
        if not self.max > self.min:
            raise ValueError(f"column {self.name}: max ({self.max}) must be greater than min ({self.min})")
        if self.missing == "fill" and self.fill is None:
            raise ValueError(f"column {self.name}: missing: fill needs a `fill` value")
        return self


class CategoricalColumn(_Strict):
    name: str
    type: Literal["categorical"]
    vocabulary: tuple[str, ...]
    unknown: Literal["other", "error"] = "other"
    missing: MissingPolicy = "error"
    fill: str | None = None
    missing_spellings: tuple[str, ...] = ("",)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> CategoricalColumn:
        if not self.vocabulary:
            raise ValueError(f"column {self.name}: vocabulary must not be empty")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"column {self.name}: vocabulary has duplicates")
        if self.missing == "fill" and self.fill not in self.vocabulary:
            raise ValueError(f"column {self.name}: missing: fill needs a `fill` value from the vocabulary")
        reserved = {"(other)", "(missing)"} & set(self.vocabulary)
        if reserved:
            raise ValueError(f"column {self.name}: {sorted(reserved)} is reserved for the loader's own buckets")
        return self


class BooleanColumn(_Strict):
    name: str
    type: Literal["boolean"]
    true_values: tuple[str, ...] = ("1", "yes", "Yes", "true", "True")
    false_values: tuple[str, ...] = ("0", "no", "No", "false", "False")
    missing: MissingPolicy = "error"
    fill: bool | None = None
    missing_spellings: tuple[str, ...] = ("",)
    description: str = ""


Column = Annotated[NumericColumn | CategoricalColumn | BooleanColumn, Field(discriminator="type")]


class IdSpec(_Strict):
    """Either an id column, or ``derive: row_number`` for tables without one (Bank Marketing).

    A derived id is written into ``derived_column`` when fedcrm splits such a table into regions, so
    that a customer keeps the same id in their region's file; when that column is present it is used.
    """

    column: str | None = None
    derive: Literal["row_number"] | None = None
    prefix: str = ""
    derived_column: str = "customer_id"

    @model_validator(mode="after")
    def _one(self) -> IdSpec:
        if (self.column is None) == (self.derive is None):
            raise ValueError("id needs exactly one of `column` or `derive: row_number`")
        return self


class LabelSpec(_Strict):
    column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


class ConsentSpec(_Strict):
    """A consent column and the purpose it gates: only customers who said yes train that purpose."""

    column: str
    purpose: str
    granted: tuple[str, ...] = ("1", "yes", "Yes", "true", "True")
    refused: tuple[str, ...] = ("0", "no", "No", "false", "False", "")


class ExcludedColumn(_Strict):
    name: str
    reason: str


class SensitiveAttribute(_Strict):
    """A protected attribute kept for fairness reports; not a feature unless ``use_as_feature``."""

    column: Column
    bands: tuple[float, ...] = ()
    use_as_feature: bool = False

    @model_validator(mode="after")
    def _check(self) -> SensitiveAttribute:
        if self.bands and not isinstance(self.column, NumericColumn):
            raise ValueError(f"sensitive column {self.column.name}: `bands` are only for numeric columns")
        if any(hi <= lo for lo, hi in zip(self.bands, self.bands[1:], strict=False)):
            raise ValueError(f"sensitive column {self.column.name}: `bands` must increase, got {list(self.bands)}")
        return self


class Schema(_Strict):
    name: str
    description: str = ""
    delimiter: str | None = None
    # How the table writes a number's decimal point: "," for a European spreadsheet's export (`29,85`).
    # The file's, like its delimiter, but declared: "1.234" reads 1.234 or 1234 depending on it.
    decimal: Literal[".", ","] = "."
    id: IdSpec
    label: LabelSpec
    purposes: tuple[str, ...]
    features: tuple[Column, ...]
    sensitive: tuple[SensitiveAttribute, ...] = ()
    consent: tuple[ConsentSpec, ...] = ()
    excluded: tuple[ExcludedColumn, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Schema:
        names = [c.name for c in self.features] + [s.column.name for s in self.sensitive]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"columns declared twice: {sorted(dupes)}")
        reserved = {self.label.column} | ({self.id.column} if self.id.column else set())
        if reserved & set(names):
            raise ValueError(
                f"columns {sorted(reserved & set(names))} are the id or the label and cannot be features "
                "or sensitive attributes"
            )
        excluded = {e.name for e in self.excluded}
        if excluded & set(names):
            raise ValueError(f"columns both used and excluded: {sorted(excluded & set(names))}")
        for c in self.consent:
            if c.purpose not in self.purposes:
                raise ValueError(f"consent column {c.column} gates unknown purpose {c.purpose!r}")
        return self

    @property
    def model_columns(self) -> tuple[Column, ...]:
        """Columns the model sees, in a fixed order: features, then sensitive ones used as features."""
        return self.features + tuple(s.column for s in self.sensitive if s.use_as_feature)

    def consent_for(self, purpose: str) -> ConsentSpec | None:
        if purpose not in self.purposes:
            raise ConfigError(
                f"schema {self.name}: purpose {purpose!r} is not declared (declared: {list(self.purposes)})"
            )
        return next((c for c in self.consent if c.purpose == purpose), None)

    def columns_read(self) -> list[str]:
        """Every column fedcrm reads from the table (data minimisation: nothing else is loaded)."""
        cols = [self.id.column] if self.id.column else []
        cols += [self.label.column] + [c.name for c in self.model_columns]
        cols += [s.column.name for s in self.sensitive if not s.use_as_feature]
        cols += [c.column for c in self.consent]
        return list(dict.fromkeys(cols))


def load_schema(path: str | Path) -> Schema:
    return load_yaml_model(Schema, Path(path))


def schema_from_text(text: str, *, source: str = "<schema>") -> Schema:
    """Parse a schema sent as YAML text (the server sends the run's schema to every region)."""
    import yaml

    from fedcrm.yamlio import validate_mapping

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a schema must be a mapping")
    return validate_mapping(Schema, raw, source=source)
