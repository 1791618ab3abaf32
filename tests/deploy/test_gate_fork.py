"""The region executor's fork per message: a child's failure is its own, and the executor reaps it.

The whole path (a forked, gated ClientApp answering a real SuperNode, refused bundles included) runs in
tests/deploy/test_bundle_gate_e2e.py and the other deployment tests; this checks the executor's side.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from fedcrm.deploy import gate

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the executor forks only where there is fork")


def test_a_failing_child_exits_non_zero_and_is_reaped(tmp_path: Path) -> None:
    # A trust file that does not parse: the gated process refuses to start, as it must, with exit 1.
    trust = tmp_path / "trust.yaml"
    trust.write_text("approved_bundles: [not-a-digest]\n")
    pid = gate._fork_gated_clientapp(
        runtime_api_address="127.0.0.1:9", token="t", trust_path=trust, insecure=True,
        root_certificates=None, parent_pid=os.getpid(),
    )  # fmt: skip
    assert pid != os.getpid()
    deadline = time.monotonic() + 60
    children = {pid}
    while children and time.monotonic() < deadline:
        children = gate._reap(children)
        time.sleep(0.05)
    assert not children, "the executor did not reap its finished child"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already waited for: no zombie left


def test_the_child_exit_code_is_the_clientapp_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower ends a ClientApp process with sys.exit(code): the child passes that code on, and a
    # SystemExit never returns into the executor's loop.
    monkeypatch.setattr(gate, "run_gated_clientapp", lambda **_: sys.exit(7))
    pid = gate._fork_gated_clientapp(
        runtime_api_address="x", token="t", trust_path=tmp_path, insecure=True, root_certificates=None,
        parent_pid=None,
    )  # fmt: skip
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
