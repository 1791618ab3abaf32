"""Reading YAML files into validated pydantic models, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedcrm.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: ``source: key.path must be ..., got ...``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key `{key}` (check its spelling; it is not a known setting)")
        elif e["type"] == "missing":
            lines.append(f"{source}: `{key}` is required but missing")
        else:
            found = e.get("input")
            found_s = repr(found) if not isinstance(found, dict) else "a mapping"
            lines.append(f"{source}: `{key}`: {e['msg']}, got {found_s}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return raw


def validate_mapping(model: type[M], raw: dict[str, Any], *, source: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(source, e)) from None


def load_yaml_model(model: type[M], path: Path) -> M:
    """Load ``path`` as ``model``; unknown keys and bad values raise :class:`ConfigError`."""
    return validate_mapping(model, read_yaml_mapping(path), source=str(path))
