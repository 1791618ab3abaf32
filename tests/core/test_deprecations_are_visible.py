"""Deprecation warnings are silenced one message at a time, never as a category: a deprecation in
Flower, Opacus or torch that touches fedcrm shows in the test summary and to a developer running the CLI."""

from __future__ import annotations

import sys
import warnings

import pytest


def _shown(message: str, *, module: str) -> bool:
    """Whether a DeprecationWarning raised from ``module`` passes the filters in force (pytest's
    ``filterwarnings`` from pyproject.toml apply inside a test)."""
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters in force; only records
        warnings.warn_explicit(
            message, DeprecationWarning, filename=f"{module}.py", lineno=1, module=module, registry={}
        )
    return len(caught) == 1


def test_a_library_deprecation_is_not_silenced_by_the_test_configuration() -> None:
    assert _shown(
        "The `run_simulation` function is deprecated and will be removed", module="flwr.simulation.run_simulation"
    )
    assert _shown("torch.cuda.amp.autocast is deprecated", module="opacus.optimizers.optimizer")


def test_only_the_meant_message_from_the_meant_module_is_silenced() -> None:
    click = "'click.utils.get_binary_stream' is deprecated and will be removed in Click 9.0."
    assert not _shown(click, module="typer")
    assert _shown(click, module="fedcrm.cli")  # the same words from anywhere else still show


def test_the_cli_installs_no_blanket_deprecation_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcrm import cli

    monkeypatch.setattr(sys, "argv", ["fedcrm", "--help"])
    with warnings.catch_warnings():
        with pytest.raises(SystemExit):
            cli.main()
        # cli.main ran in this process: a filter it installed now decides for every later warning.
        assert _shown("The `run_simulation` function is deprecated", module="flwr.simulation.run_simulation")
