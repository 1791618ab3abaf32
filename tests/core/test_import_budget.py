"""What each command imports: a data owner's day never waits for a deep-learning stack (issue 27).

The data owner's commands (budget, forget, erasures, consent, export, audit verify, certs, bundle)
must load none of torch, opacus, flwr or ray: importing them took 5-7 s of a 5-7 s command. The
commands that load a run's model (score, explain, an export with --run) load torch for it, and nothing
of the federation or of DP training.

The commands run through the CLI's ``main`` on a real region (a synthetic table, a run folder with a
served model, a ledger of ten rounds), one after another in one fresh interpreter (one interpreter per
command took seconds more), and the packages each loaded are read back: those new in ``sys.modules``
after it. A package an earlier command loaded is not new for a later one, but then the earlier fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
from bench_startup import RegionFiles, data_owner_commands, model_commands, region_state  # noqa: E402

TRAINING_STACK = frozenset({"torch", "opacus", "flwr", "ray"})
FEDERATION_AND_DP = frozenset({"opacus", "flwr", "ray"})
# `bundle hash` and `bundle sign` build the bundle with Flower's own builder, so that the digest a data
# owner approves is that of the very bytes `flwr run` submits: Flower's CLI package, never torch or Ray.
# It runs last in its table, so Flower is never an earlier command's.
BUILT_BY_FLOWER = frozenset({"bundle hash"})

# Runs `fedcrm ARGS` for each (name, ARGS) of $COMMANDS_IN in turn; writes {name: [exit code, the
# top-level packages new in sys.modules after it]} to $LOADED_OUT.
_CHILD = """
import json, os, sys
from fedcrm.cli import main

def packages():
    return {name.split(".")[0] for name in sys.modules}

loaded = {}
for name, args in json.loads(open(os.environ["COMMANDS_IN"]).read()):
    before, sys.argv = packages(), ["fedcrm", *args]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    loaded[name] = [code, sorted(packages() - before)]
open(os.environ["LOADED_OUT"], "w").write(json.dumps(loaded))
"""


def loaded_by_each(commands: dict[str, list[str]], *, workdir: Path) -> dict[str, set[str]]:
    """The top-level packages each of ``commands`` loaded, run in order in one fresh interpreter."""
    commands_in, loaded_out = workdir / "commands.json", workdir / "loaded.json"
    commands_in.write_text(json.dumps(list(commands.items())))
    env = {**os.environ, "COMMANDS_IN": str(commands_in), "LOADED_OUT": str(loaded_out), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    loaded = json.loads(loaded_out.read_text())
    failed = {name: code for name, (code, _) in loaded.items() if code != 0}
    assert not failed, f"commands failed (exit codes {failed}):\n{done.stdout}\n{done.stderr}"
    return {name: set(packages) for name, (_, packages) in loaded.items()}


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> RegionFiles:
    return region_state(tmp_path_factory.mktemp("import-budget"), customers=300)


@pytest.fixture(scope="module")
def data_owner_loaded(region: RegionFiles) -> dict[str, set[str]]:
    return loaded_by_each(data_owner_commands(region), workdir=region.scratch)


@pytest.fixture(scope="module")
def model_loaded(region: RegionFiles) -> dict[str, set[str]]:
    return loaded_by_each(model_commands(region), workdir=region.scratch)


def _command_names(table) -> list[str]:  # noqa: ANN001
    """The names of a table of commands (their arguments need a region: the fixture's)."""
    nowhere = Path("/nonexistent")
    return list(table(RegionFiles(nowhere, nowhere, nowhere, nowhere, nowhere, customers=("-",) * 8)))


@pytest.mark.parametrize("command", _command_names(data_owner_commands))
def test_data_owner_command_imports_no_torch_opacus_flower_or_ray(
    command: str, data_owner_loaded: dict[str, set[str]]
) -> None:
    stack = data_owner_loaded[command] & TRAINING_STACK
    assert stack <= ({"flwr"} if command in BUILT_BY_FLOWER else set()), f"fedcrm {command} imported {sorted(stack)}"


@pytest.mark.parametrize("command", _command_names(model_commands))
def test_command_that_loads_a_model_imports_nothing_of_the_federation_or_dp_training(
    command: str, model_loaded: dict[str, set[str]]
) -> None:
    extra = model_loaded[command] & FEDERATION_AND_DP
    assert not extra, f"fedcrm {command} imported {sorted(extra)}"


def test_commands_that_load_a_model_do_import_torch_for_it(model_loaded: dict[str, set[str]]) -> None:
    # Else the test above would pass on commands that did nothing.
    assert "torch" in set().union(*model_loaded.values())


# A ClientApp process of the simulation unpickles the ClientApp, mods and all, and so imports the modules
# they come from; it then prints which of the server's side it loaded.
_UNPICKLE_CLIENT_APP = """
import pickle, sys
pickle.loads(sys.stdin.buffer.read())
print(sorted(m for m in sys.modules if m in ("fedcrm.fl.server", "fedcrm.fl.strategy", "fedcrm.fl.simulation")))
"""


def test_simulated_client_app_process_imports_nothing_of_the_server_side(tmp_path: Path) -> None:
    # What Ray does with the ClientApp that `fedcrm run` builds: each ClientApp process imported the
    # server's strategy and the simulation driver for the node-config mod, ~1 s a process before 0.2.0.
    from ray import cloudpickle

    from fedcrm.fl.client import build_client_app
    from fedcrm.fl.simulation import simulated_node_config, write_node_table

    table = write_node_table({0: {"region": "eu"}}, state_root=tmp_path)
    app = build_client_app(mods=[simulated_node_config(table)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = [sys.executable, "-c", _UNPICKLE_CLIENT_APP]
    done = subprocess.run(child, input=cloudpickle.dumps(app), cwd=REPO, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "[]"
