"""Every setting an experiment config accepts changes something: each field of ExperimentConfig
(recursively) is read by fedcrm code outside config.py. A setting that validates but is never read
(`budget` and `evaluation.min_customers` were: the region's policy decided) cannot come back unnoticed.

"Read" means an attribute access to the field on something that holds its section: ``cfg.training.
rounds`` (through the section's field name), ``training.optimizer`` where ``training`` is annotated
``TrainingConfig`` in fedcrm, or ``sp.by`` after ``sp = cfg.split``. Serialising the whole config
(``to_dict()`` for MLflow or the run folder) does not count: it touches every field and uses none.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
from conftest import write_tiny_config
from pydantic import BaseModel

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "fedcrm"

# Settings that accept only their default and refuse any other value with the reason: the value that
# is refused is checked below, so this list cannot hide a setting that is silently ignored.
REFUSING_PLACEHOLDERS = {"unlearning.slices": 2}  # SISA slicing is not implemented (docs/erasure.md)


def _section_of(annotation: object) -> type[BaseModel] | None:
    """The config section a field holds (``SplitConfig | None`` holds SplitConfig), or None for a value."""
    for t in typing.get_args(annotation) or (annotation,):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def config_fields() -> list[tuple[str, type[BaseModel], str, str | None]]:
    """(dotted path, class declaring the field, field name, the section's own field name or None)."""
    found: list[tuple[str, type[BaseModel], str, str | None]] = []

    def walk(model: type[BaseModel], prefix: str, via: str | None) -> None:
        for name, field in model.model_fields.items():
            found.append((prefix + name, model, name, via))
            section = _section_of(field.annotation)
            if section is not None:
                walk(section, f"{prefix}{name}.", name)

    walk(ExperimentConfig, "", None)
    return found


def _holder(node: ast.expr) -> str | None:
    """The name an attribute is read from: `cfg` in cfg.seed, `training` in cfg.training.rounds."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def package_reads() -> tuple[set[tuple[str, str]], dict[str, set[str]]]:
    """Attribute reads (holder, attribute) in fedcrm/ outside config.py, and the names bound to each
    config class there (annotated with it, or assigned a section: ``sp = cfg.split``)."""
    sections = {
        name: s.__name__
        for _, model, name, _ in config_fields()
        if (s := _section_of(model.model_fields[name].annotation)) is not None
    }
    classes = {model.__name__ for _, model, _, _ in config_fields()}
    reads: set[tuple[str, str]] = set()
    bound: dict[str, set[str]] = {c: set() for c in classes}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            annotated: tuple[str | None, ast.expr] | None = None
            if isinstance(node, ast.arg) and node.annotation is not None:
                annotated = (node.arg, node.annotation)
            elif isinstance(node, ast.AnnAssign):
                annotated = (_holder(node.target), node.annotation)
            if annotated is not None and annotated[0]:
                for word in re.findall(r"\w+", ast.unparse(annotated[1])):
                    if word in classes:
                        bound[word].add(annotated[0])
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and node.value.attr in sections:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        bound[sections[node.value.attr]].add(target.id)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                holder = _holder(node.value)
                if holder:
                    reads.add((holder, node.attr))
    return reads, bound


def test_every_config_setting_is_read_outside_config_py() -> None:
    reads, bound = package_reads()
    unread = [
        path
        for path, model, name, via in config_fields()
        if path not in REFUSING_PLACEHOLDERS
        and not any((holder, name) in reads for holder in bound[model.__name__] | ({via} if via else set()))
    ]
    assert not unread, (
        f"settings that validate but that no code in fedcrm/ reads: {unread}. Read them, or remove them "
        "and list them in fedcrm.config.REMOVED_SETTINGS, so that a config that sets them is refused"
    )


@pytest.mark.parametrize("key", sorted(REFUSING_PLACEHOLDERS))
def test_placeholder_settings_refuse_any_other_value(tmp_path: Path, key: str) -> None:
    cfg = load_config(write_tiny_config(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(key)):
        cfg.with_overrides({key: REFUSING_PLACEHOLDERS[key]})


def test_the_check_walks_every_section_and_sees_reads() -> None:
    paths = {p for p, _, _, _ in config_fields()}
    assert {"training.rounds", "privacy.delta", "split.by", "tracking.uri", "seed", "schema_path"} <= paths
    reads, bound = package_reads()
    assert ("training", "rounds") in reads and "sp" in bound["SplitConfig"] and "cfg" in bound["ExperimentConfig"]
