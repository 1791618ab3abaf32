"""Simulation on a Ray cluster that was already running: two Ray nodes on loopback, each with one CPU.

`fedcrm run --ray-address` attaches Flower's simulation to the cluster instead of starting Ray; the
test checks that ClientApps ran on both nodes, that the run is a normal run (ledgers, model), that the
cluster is left running for the next run, and stops only the nodes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import write_tiny_config
from flwr.app import Context, Message

from fedcrm.config import load_config
from fedcrm.errors import ConfigError
from fedcrm.fl.simulation import run_simulated
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive_nodes(address: str) -> set[str]:
    """The ids of the cluster's live nodes, asked from a separate driver (this process stays Ray-free)."""
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@contextmanager
def loopback_ray_cluster(nodes: int, *, logs: Path) -> Iterator[str]:
    """A Ray head and ``nodes - 1`` workers on 127.0.0.1, one CPU each; stopped by pid on exit.

    ``ray start --block`` keeps each node's supervisor in the foreground: terminating it stops that
    node's processes and nothing else (``ray stop`` would stop every Ray on the machine).
    """
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # The head's own temp folder (short: Ray's socket paths must fit 107 bytes), so that the address
    # `ray start` leaves for ray.init() to join is not /tmp/ray's, which every Ray on the machine reads.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    started: list[subprocess.Popen[bytes]] = []
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(nodes):
            head = ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"]
            where = head if i == 0 else [f"--address={address}"]
            with (logs / f"node-{i}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(
                        [str(RAY), "start", *where, "--num-cpus=1", "--block"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            deadline = time.monotonic() + 120
            while len(_alive_nodes(address) if i else _head_up(port)) < i + 1:
                if time.monotonic() > deadline or started[-1].poll() is not None:
                    raise RuntimeError(f"Ray node {i} did not start: {(logs / f'node-{i}.log').read_text()[-2000:]}")
                time.sleep(1)
        yield address
    finally:
        for p in reversed(started):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _head_up(port: int) -> set[str]:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return set()
    return {"head"}


def record_ray_node(folder: Path) -> Callable[[Message, Context, Callable[..., Message]], Message]:
    """Test-only client mod: leaves a file named after the Ray node that handled each message."""

    def mod(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        import ray

        (folder / f"{ray.get_runtime_context().get_node_id()}-{os.getpid()}").touch()
        return call_next(msg, context)

    return mod


@pytest.mark.slow
def test_a_federation_runs_on_both_nodes_of_a_running_ray_cluster(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 400, "us": 400, "apac": 400, "latam": 400}))
    seen = tmp_path / "seen"
    seen.mkdir()
    with loopback_ray_cluster(2, logs=tmp_path / "ray") as address:
        nodes = _alive_nodes(address)
        assert len(nodes) == 2
        summary = run_simulated(
            cfg,
            run_dir=tmp_path / "run",
            state_root=tmp_path / "state",
            report=lambda s: None,
            client_mods=[record_ray_node(seen)],
            ray_address=address,
        )
        assert _alive_nodes(address) == nodes, "the run stopped the cluster it was lent"
    assert not _head_up(int(address.rpartition(":")[2])), "the test's Ray head is still running"
    ran_on = {p.name.rsplit("-", 1)[0] for p in seen.iterdir()}
    assert ran_on == nodes, f"ClientApps ran on {len(ran_on)} of the cluster's 2 nodes"
    assert summary.rounds_completed == cfg.training.rounds
    for region in cfg.regions:
        trained = [
            e
            for e in PrivacyLedger.open(tmp_path / "state" / region, region=region).events()
            if e.mechanism == MECHANISM_DP_SGD
        ]
        assert len(trained) == cfg.training.rounds
    assert (tmp_path / "run" / "model" / "model.json").exists()


def test_an_unreachable_ray_address_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300}))
    port = _free_port()  # nothing listens there
    with pytest.raises(ConfigError, match=f"--ray-address 127.0.0.1:{port}: no Ray head answers there"):
        run_simulated(
            cfg,
            run_dir=tmp_path / "run",
            state_root=tmp_path / "state",
            report=lambda s: None,
            ray_address=f"127.0.0.1:{port}",
        )
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        run_simulated(
            cfg,
            run_dir=tmp_path / "run",
            state_root=tmp_path / "state",
            report=lambda s: None,
            ray_address="ray://somewhere",
        )
