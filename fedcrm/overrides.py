"""Config overrides as ``KEY=VALUE`` pairs: ``fedcrm run --set`` and, in deployment, the run config key
``overrides`` (``flwr run --run-config 'overrides="training.rounds=20 privacy.target_epsilon=1"'``).

Both are parsed here, the same way: each value typed by YAML (``20`` int, ``1e-5`` float, ``[a, b]``), then
applied with :meth:`ExperimentConfig.with_overrides`, which validates the result like the file, so the run's
``config.yaml`` records the values the run used.
"""

from __future__ import annotations

import shlex
from typing import Any

from fedcrm.errors import ConfigError


def parse_overrides(pairs: list[str], *, option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict of dotted keys to YAML-typed values; ``option`` names where they came from."""
    import yaml

    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {pair!r}: expected KEY=VALUE, e.g. training.rounds=20")
        try:
            found[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{option} {pair!r}: the value is not valid YAML ({e})") from None
    return found


def parse_override_text(text: str, *, option: str) -> dict[str, Any]:
    """Whitespace-separated ``KEY=VALUE`` pairs in one string (shell quoting for a value with spaces)."""
    try:
        pairs = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"{option} {text!r}: {e} (expected KEY=VALUE pairs separated by spaces)") from None
    return parse_overrides(pairs, option=option)
