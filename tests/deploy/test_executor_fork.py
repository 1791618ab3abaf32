"""The warm executors' fork per task: a child's failure is its own, the executor reaps it, and a child
starts as a fresh process would (no bundle module preloaded, none of the executor's exit handlers).

The whole path (forked ServerApps and gated ClientApps against a real SuperLink and SuperNodes, refused
bundles included) runs in the deployment tests; this checks the executor's side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcrm.deploy import executor, gate

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the executors fork only where there is fork")


def _gated(trust: Path) -> int:
    task = executor.Task(runtime_api_address="127.0.0.1:9", token="t", insecure=True, root_certificates=None,
                         parent_pid=os.getpid())  # fmt: skip
    return executor.fork_task(lambda: gate.run_gated_clientapp(task, trust_path=trust), what="gated ClientApp")


def test_a_failing_child_exits_non_zero_and_is_reaped(tmp_path: Path) -> None:
    # A trust file that does not parse: the gated process refuses to start, as it must, with exit 1.
    trust = tmp_path / "trust.yaml"
    trust.write_text("approved_bundles: [not-a-digest]\n")
    pid = _gated(trust)
    assert pid != os.getpid()
    deadline = time.monotonic() + 60
    children = {pid}
    while children and time.monotonic() < deadline:
        children = executor.reap(children)
        time.sleep(0.05)
    assert not children, "the executor did not reap its finished child"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already waited for: no zombie left


def test_the_child_exit_code_is_the_app_s() -> None:
    # Flower ends its app processes with sys.exit(code): the child passes that code on, and a
    # SystemExit never returns into the executor's loop.
    pid = executor.fork_task(lambda: sys.exit(7), what="t")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_a_task_does_not_run_the_executor_s_exit_handlers(tmp_path: Path) -> None:
    # The executor registers Flower exit handlers (closing its Runtime API client); a ServerApp ends with
    # flwr_exit, which runs every registered handler: in a fork it must run only its own.
    from flwr.supercore.exit import add_exit_handler, exit_handler, flwr_exit

    marker = tmp_path / "parent-handler-ran"

    def parents() -> None:
        marker.write_text("the executor's exit handler ran in its child")

    add_exit_handler(parents)
    try:
        pid = executor.fork_task(lambda: flwr_exit(0, "task done", emit_telemetry=False), what="t")
        _, status = os.waitpid(pid, 0)
    finally:
        exit_handler.registered_exit_handlers[:] = [
            h for h in exit_handler.registered_exit_handlers if h.exit_handler is not parents
        ]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert not marker.exists()


def test_the_executors_preload_no_module_of_the_app_bundle() -> None:
    # A module preloaded under a bundle's name (`server`, `clients`) would run instead of the bundle's own.
    code = (
        "import sys; from fedcrm.deploy import executor, gate, server_exec; gate._preload(); server_exec._preload(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in executor.BUNDLE_MODULES))"
    )

    def preloaded(prefixes: str) -> str:
        run = [sys.executable, "-c", code.replace("executor.BUNDLE_MODULES", prefixes)]
        out = subprocess.run(run, capture_output=True, text=True, cwd="/", timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert preloaded("executor.BUNDLE_MODULES") == "[]"
    assert "fedcrm.fl.server" in preloaded("('fedcrm',)")  # the same check sees what was preloaded
