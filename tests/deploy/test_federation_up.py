"""A federation that stays up: ``fedcrm deploy up / status / down`` and ``fedcrm run --federation``.

The end-to-end test drives the real CLI in subprocesses (as an operator would: each command exits and
the federation must outlive it) on a real TLS SuperLink and two SuperNodes on loopback: a few minutes,
marked ``deployment`` and ``slow`` like the other real-deployment tests. The pid-reuse test is quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tiny_config

from fedcrm.deploy.supervisor import Recorded, start_ticks
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger

REPO = Path(__file__).resolve().parents[2]


def fedcrm(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedcrm.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def flower_processes_under(folder: Path) -> list[str]:
    """Live processes whose FLWR_HOME lies under ``folder``: everything a deployment started."""
    from fedcrm.deploy.supervisor import processes_with_env

    return [
        f"{p} {Path(f'/proc/{p}/cmdline').read_bytes()[:120]!r}" for p in processes_with_env("FLWR_HOME", under=folder)
    ]


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """``deploy down`` signals a recorded pid only while it runs the recorded process (start time, command)."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        real = Recorded.of_pid(sleeper.pid, name="x", log_path=tmp_path)
        assert real.running()
        # The same pid with another start time, or another command line: a pid the kernel gave to someone else.
        for impostor in (
            Recorded(name="x", pid=sleeper.pid, started=real.started + 1, cmdline=real.cmdline, log_path=tmp_path),
            Recorded(name="x", pid=sleeper.pid, started=real.started, cmdline="flower-supernode", log_path=tmp_path),
        ):
            assert not impostor.running()
            assert impostor.stop(grace_s=1, hard_s=1) == []
            assert sleeper.poll() is None and start_ticks(sleeper.pid) == real.started
        assert real.stop(grace_s=5, hard_s=5) == []
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_the_run_config_carries_a_retrain_to_the_server_app(tmp_path: Path) -> None:
    """``retrain --federation``: the deployment ServerApp trains only ``shards``, keeps the others' weights."""
    import numpy as np

    from fedcrm.runs import save_weights
    from server.server_app import retrain_arguments

    assert retrain_arguments({"experiment-config": "configs/demo.yaml"}) == {}  # an ordinary run
    kept = {"w": np.arange(3.0), "b": np.ones(1)}
    save_weights(tmp_path / "constituent-0.npz", kept)
    save_weights(tmp_path / "constituent-2.npz", kept)
    got = retrain_arguments({"shards": "1,3", "initial-dir": str(tmp_path), "model-version": "4"})
    assert got["shards"] == [1, 3] and got["model_version"] == 4
    assert sorted(got["initial"]) == [0, 2]
    assert np.array_equal(got["initial"][2]["w"], kept["w"])


@pytest.mark.deployment
@pytest.mark.slow
def test_up_run_kill_status_run_without_it_restart_down(tmp_path: Path) -> None:
    cfg = write_tiny_config(
        tmp_path, regions={"eu": 500, "us": 400}, overrides={"federation.min_regions": 1, "unlearning.shards": 2}
    )
    folder = tmp_path / ".fedcrm" / "deployments" / "t"
    bystander = subprocess.Popen(["sleep", "900"], start_new_session=True)  # not ours: must survive `down`
    try:
        up = fedcrm("deploy", "up", "--config", str(cfg), "--name", "t", "--state", "state", cwd=tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        desc = json.loads((folder / "federation.json").read_text())
        assert set(desc["processes"]) == {
            "superlink", "server-exec", "supernode-eu", "supernode-us", "exec-eu", "exec-us"
        }  # fmt: skip
        assert sorted(p.name for p in (folder / "pids").glob("*.pid")) == sorted(f"{k}.pid" for k in desc["processes"])

        # The command has exited; the federation is still up.
        st = fedcrm("deploy", "status", "--name", "t", "--json", cwd=tmp_path)
        assert st.returncode == 0, st.stdout + st.stderr
        status = json.loads(st.stdout)
        assert all(p["alive"] for p in status["processes"].values()), status
        assert {r: n["status"] for r, n in status["nodes"].items()} == {"eu": "online", "us": "online"}

        run = fedcrm("run", str(cfg), "--federation", "t", "--out", str(tmp_path / "run"), cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr[-3000:]
        assert "finished:completed" in run.stdout
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["rounds_completed"] == 2
        for region in ("eu", "us"):  # the deployment's regions charged their own ledgers, under --state
            events = PrivacyLedger.open(tmp_path / "state" / region, region=region).events()
            assert {e.round for e in events if e.status == "sent"} >= {1, 2}, (region, events)

        # An erasure served on the same federation: only the stale constituent is retrained there.
        from fedcrm.runs import ModelMeta
        from fedcrm.unlearning.retrain import run_view

        view = run_view(tmp_path / "run", region="eu", state_root=tmp_path / "state")
        customer, shard = next(iter(view.trained.items()))
        eu_before = len(PrivacyLedger.open(tmp_path / "state" / "eu", region="eu").events())
        forget = fedcrm(
            "forget",
            "--region",
            "eu",
            "--customer-id",
            customer,
            "--run",
            str(tmp_path / "run"),
            "--state",
            "state",
            cwd=tmp_path,
        )
        assert forget.returncode == 0, forget.stdout + forget.stderr
        served = ModelMeta.read(tmp_path / "run").version  # 2: the stale constituent already excluded
        retrain = fedcrm("retrain", str(tmp_path / "run"), "--federation", "t", "--json", cwd=tmp_path)
        assert retrain.returncode == 0, retrain.stdout + retrain.stderr[-3000:]
        result = json.loads(retrain.stdout)
        assert result["stale"] == [shard] and result["model_version"] == served + 1, result
        assert ModelMeta.read(tmp_path / "run").version == served + 1
        assert sorted(ModelMeta.read(tmp_path / "run").shards) == [0, 1]  # both constituents served again
        assert len(result["receipts"]) == 1
        retrained = PrivacyLedger.open(tmp_path / "state" / "eu", region="eu").events()[eu_before:]
        trained = [e for e in retrained if e.mechanism == MECHANISM_DP_SGD]
        assert trained and {e.shard for e in trained} == {shard}, retrained  # training charged to that shard only
        assert not (folder / "retrains").exists() or not any((folder / "retrains").iterdir())

        # A SuperNode dies (by pid, as a crash would): status says so, with a non-zero exit.
        eu_pid = desc["processes"]["supernode-eu"]["pid"]
        os.kill(eu_pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and start_ticks(eu_pid) is not None:
            time.sleep(0.2)
        st = fedcrm("deploy", "status", "--name", "t", "--json", cwd=tmp_path)
        assert st.returncode == 1, st.stdout + st.stderr
        status = json.loads(st.stdout)
        assert status["ok"] is False and status["processes"]["supernode-eu"]["alive"] is False
        assert status["processes"]["supernode-us"]["alive"] and status["processes"]["superlink"]["alive"]

        # A run submitted while eu is down completes with us alone (min_regions 1): eu's ledger gains
        # nothing, us's the run's rounds. (eu answers nothing; the SuperLink marks it offline within two
        # heartbeats, and its messages then come back as errors, which the run counts as eu failing.)
        def releases(region: str) -> int:
            return len(PrivacyLedger.open(tmp_path / "state" / region, region=region).events())

        eu_releases, us_releases = releases("eu"), releases("us")
        out = tmp_path / "run-without-eu"
        degraded = fedcrm("run", str(cfg), "--federation", "t", "--out", str(out), cwd=tmp_path)
        assert degraded.returncode == 0, degraded.stdout + degraded.stderr[-3000:]
        assert "finished:completed" in degraded.stdout
        assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 2
        assert releases("eu") == eu_releases
        assert releases("us") > us_releases

        # Every run so far (two trainings, one retrain) was a fork of the same warm ServerApp executor.
        recorded = json.loads((folder / "federation.json").read_text())["processes"]
        assert recorded["server-exec"]["pid"] == desc["processes"]["server-exec"]["pid"]
        # The server's executor dies too: a run would wait for a ServerApp forever, so it is refused.
        exec_pid = desc["processes"]["server-exec"]["pid"]
        os.kill(exec_pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and start_ticks(exec_pid) is not None:
            time.sleep(0.2)
        refused = fedcrm("run", str(cfg), "--federation", "t", "--out", str(tmp_path / "never"), cwd=tmp_path)
        assert refused.returncode != 0 and "deploy up" in refused.stderr, refused.stdout + refused.stderr[-2000:]

        # `deploy up` again restarts only what is missing; the SuperLink and us keep their processes.
        again = fedcrm("deploy", "up", "--config", str(cfg), "--name", "t", "--state", "state", cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        after = json.loads((folder / "federation.json").read_text())["processes"]
        for kept in ("superlink", "supernode-us", "exec-us"):
            assert after[kept]["pid"] == desc["processes"][kept]["pid"], kept
        assert after["supernode-eu"]["pid"] != eu_pid
        assert after["server-exec"]["pid"] != exec_pid
        st = fedcrm("deploy", "status", "--name", "t", "--json", cwd=tmp_path)
        assert st.returncode == 0, st.stdout + st.stderr

        down = fedcrm("deploy", "down", "--name", "t", cwd=tmp_path)
        assert down.returncode == 0, down.stdout + down.stderr
        assert flower_processes_under(folder) == []
        assert list((folder / "pids").glob("*.pid")) == []
        assert bystander.poll() is None  # an unrelated process is never touched
        down_again = fedcrm("deploy", "down", "--name", "t", cwd=tmp_path)
        assert down_again.returncode == 0 and "it was down" in down_again.stderr, down_again.stderr
        st = fedcrm("deploy", "status", "--name", "t", cwd=tmp_path)
        assert st.returncode == 1
    finally:
        if folder.exists() and flower_processes_under(folder):
            fedcrm("deploy", "down", "--name", "t", cwd=tmp_path)
        bystander.kill()
        bystander.wait()
