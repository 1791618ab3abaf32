"""Real deployments on loopback: flower-superlink + one flower-supernode per region, started and stopped
by these tests (every process, checked: LocalDeployment.stop raises if anything survives).

Each test costs a full Flower deployment (a fresh `flwr-clientapp` process per message, each importing
torch): about 1-3 minutes on an idle 2-core machine, far more on a loaded one. They are marked
`deployment` (``make test-deployment``) and `slow` (not in the default run).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PERMISSIVE_POLICY, exact_holdout_metrics, same_region_state, write_tiny_config

from fedcrm import wire
from fedcrm.config import load_config
from fedcrm.deploy.certs import create_certificates, create_node_key
from fedcrm.deploy.local import COMPLETED, LocalDeployment, default_app_dir, deploy_local, region_nodes
from fedcrm.governance.audit_log import verify
from fedcrm.privacy.ledger import MECHANISM_GAUSSIAN, PrivacyLedger
from fedcrm.run_summary import RunSummary
from fedcrm.runs import read_metrics

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

# Generous: every message starts a fresh flwr-clientapp process that imports torch and opacus.
RUN_TIMEOUT_S = 1800


def flower_processes_of(workdir: Path) -> list[str]:
    """Live processes whose FLWR_HOME lies under ``workdir``: every Flower process a deployment starts
    (SuperLink, SuperNodes, their SuperExecs, ServerApp/ClientApp processes) inherits one."""
    marker = f"FLWR_HOME={workdir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                stat = (entry / "stat").read_text()
                if stat[stat.rfind(")") + 2] != "Z":
                    found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:200]!r}")
        except OSError:
            continue
    return found


def metric_values(wire_bytes: bytes, key: bytes) -> list[float]:
    """Every value of metric ``key`` in serialized Flower MetricRecords (protobuf items: the key, then a
    value message holding a double (tag 0x09), a zigzag sint64 (0x10) or a uint64 (0x18))."""
    out: list[float] = []
    for m in re.finditer(re.escape(key) + rb"\x12", wire_bytes):
        body = wire_bytes[m.end() + 1 : m.end() + 1 + wire_bytes[m.end()]]
        tag, rest = body[:1], body[1:]
        if tag == b"\x09" and len(rest) == 8:
            out.append(struct.unpack("<d", rest)[0])
        elif tag in (b"\x10", b"\x18"):
            n = sum((b & 0x7F) << (7 * i) for i, b in enumerate(rest))
            out.append(float((n >> 1) ^ -(n & 1)) if tag == b"\x10" else float(n))
    return out


def _policy(path: Path, **fields: object) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


# --- 1. TLS + authentication, 3 SuperNodes; rogue nodes are refused; quality = simulation --------------


def test_tls_authenticated_run_with_three_supernodes_matches_simulation(tmp_path: Path) -> None:
    from fedcrm.fl.simulation import run_simulated
    from fedcrm.runs import load_weights

    regions = ("eu", "us", "apac")
    # Reproducible noise (the permissive policy allows it) from the same region secrets and empty ledgers
    # in both runs, the simulation replaying the deployment's recorded nonces: the same hold-outs, the same
    # release keys, so deployment and simulation can be compared.
    cfg_path = write_tiny_config(
        tmp_path,
        regions={"eu": 500, "us": 400, "apac": 400},
        overrides={"privacy.noise": "reproducible", "policies": {r: str(PERMISSIVE_POLICY) for r in regions}},
    )
    for state in ("state", "state-sim"):
        same_region_state(tmp_path / "template", tmp_path / state, regions)
    foreign = create_certificates(out_dir=tmp_path / "foreign-ca")  # a node trusting another CA
    foreign_key, _ = create_node_key(out_dir=tmp_path / "foreign-ca", region="eu")  # same region name
    rogue_key, _ = create_node_key(out_dir=tmp_path / "rogue", region="rogue")  # key never registered
    outcomes: dict[str, tuple[int | None, str]] = {}

    def start_rogues(dep: LocalDeployment) -> None:
        unregistered = dep.start_supernode("rogue", private_key=rogue_key)
        wrong_ca = dep.start_supernode("foreign-ca", private_key=foreign_key, root_certificates=foreign.ca_cert)
        deadline = time.time() + 240
        while time.time() < deadline and (unregistered.alive() or wrong_ca.alive()):
            time.sleep(1)
        for name, comp in (("rogue", unregistered), ("foreign-ca", wrong_ca)):
            outcomes[name] = (comp.popen.poll(), comp.log_path.read_text(errors="replace"))

    lines: list[str] = []
    t0 = time.time()
    result = deploy_local(
        cfg_path,
        workdir=tmp_path / "work",
        state_root=tmp_path / "state",
        run_dir=tmp_path / "run-deployed",
        report=lines.append,
        run_timeout_s=RUN_TIMEOUT_S,
        during_run=start_rogues,
    )
    deployed_s = time.time() - t0
    assert flower_processes_of(tmp_path / "work") == []
    assert result.completed, (result.status, "\n".join(lines[-40:]))
    assert any("round   2/2" in ln for ln in lines), "progress was not streamed"

    # The SuperNode whose key was never registered is refused; the one trusting another CA fails TLS.
    code, log = outcomes["rogue"]
    assert code not in (None, 0) and "Failed to activate SuperNode" in log, log[-2000:]
    code, log = outcomes["foreign-ca"]
    assert code not in (None, 0) and "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
    # ... and neither touched the run: the three regions trained in every round, nothing failed.
    summary = result.summary
    assert summary is not None
    assert summary.events == {"refused": {}, "failed": {}, "rejected": {}}
    # Each region's key was made in its own folder; the operator's holds no region's private key. The
    # server checked every reply against the registry deploy_local recorded (no "unchecked" warning).
    # (plus the local bundle reviewer's signing key, which plays every data owner's trusted signer here).
    assert sorted(p.name for p in (tmp_path / "work" / "certs").iterdir()) == [
        "bundle-signer-local.key",
        "bundle-signer-local.pub",
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]
    assert all((tmp_path / "work" / "regions" / r / f"supernode-{r}.key").is_file() for r in ("eu", "us", "apac"))
    assert not any("no node registry" in w for w in summary.warnings)
    assert verify(result.run_dir / "audit.log", expect_head=summary.audit_head).ok
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(set(r["epsilon"]) == {"eu", "us", "apac"} for r in rows)
    # Every region answered the served model's evaluation (a metered DP answer in its ledger); a region's
    # own AUC is shown only when its noisy counts allow one (tiny hold-outs: not always).
    for region in ("eu", "us", "apac"):
        answers = PrivacyLedger.open(tmp_path / "state" / region, region=region).events()
        assert any(e.run_id == summary.run_id and e.mechanism == MECHANISM_GAUSSIAN for e in answers), region
    assert set(summary.final_metrics_by_region) <= {"eu", "us", "apac"}

    # The same config in simulation, from the same region state: the same hold-outs and, in reproducible
    # mode, the same noise and Poisson samples, so the two differ only by float rounding (summation order
    # in FedAvg, thread counts in torch): weights within 1e-3, the exact pooled AUC within 0.01.
    t1 = time.time()
    for region in regions:  # each release's nonce is random: the data owner names the recorded ones
        sim_ledger = PrivacyLedger.open(tmp_path / "state-sim" / region, region=region)
        sim_ledger.replay(PrivacyLedger.open(tmp_path / "state" / region, region=region))
    sim_cfg = load_config(cfg_path)
    sim = run_simulated(sim_cfg, run_dir=tmp_path / "run-sim", state_root=tmp_path / "state-sim", report=lambda s: None)
    sim_s = time.time() - t1
    dep_m = exact_holdout_metrics(sim_cfg, run_dir=result.run_dir, state=tmp_path / "state")
    sim_m = exact_holdout_metrics(sim_cfg, run_dir=tmp_path / "run-sim", state=tmp_path / "state-sim")
    print(f"deployed AUC {dep_m['auc']:.5f} in {deployed_s:.0f}s; simulated AUC {sim_m['auc']:.5f} in {sim_s:.0f}s")
    assert abs(dep_m["auc"] - sim_m["auc"]) <= 0.01
    assert abs(dep_m["log_loss"] - sim_m["log_loss"]) <= 0.01
    w_dep = load_weights(result.run_dir / "model" / "constituent-0.npz")
    w_sim = load_weights(tmp_path / "run-sim" / "model" / "constituent-0.npz")
    assert max(float(np.max(np.abs(w_dep[k] - w_sim[k]))) for k in w_dep) <= 1e-3
    for region in regions:
        assert summary.privacy[region]["epsilon"] == pytest.approx(sim.privacy[region]["epsilon"], rel=1e-6)


# --- 2. a SuperNode killed mid-round, then restarted -------------------------------------------------


def _ledger(state: Path, region: str) -> list[tuple[int, int, str]]:
    return [(e.id, e.round, e.status) for e in PrivacyLedger.open(state / region, region=region).events()]


def test_supernode_killed_mid_round_run_completes_and_restart_rejoins_with_ledger(tmp_path: Path) -> None:
    # 2 regions, min_regions 1: the run may go on with `us` alone. The timeout bounds the wait for the dead
    # node; it must still let a live node answer (a message costs a process start importing torch).
    # eu can be restarted only once the SuperLink has marked it offline, which is also when round 2 ends
    # (its "Node Unavailable" reply): round 3 would start without it, by a race it nearly always loses.
    # wait_for_regions_s holds round 3 until eu is back, so the rejoin is tested, not the race.
    cfg_path = write_tiny_config(
        tmp_path,
        regions={"eu": 500, "us": 400},
        overrides={
            "training.rounds": 3,
            "federation.min_regions": 1,
            "federation.round_timeout_s": 150,
            "federation.wait_for_regions_s": 600,
        },
    )
    cfg = load_config(cfg_path)
    state = tmp_path / "state"
    workdir = tmp_path / "work"
    nodes = {n.region: n for n in region_nodes(cfg, state_root=state, data_dir=workdir / "data")}
    certs = create_certificates(out_dir=workdir / "certs")
    keys = {r: create_node_key(out_dir=workdir / "regions" / r, region=r) for r in nodes}
    seen: dict[str, object] = {}
    with LocalDeployment(workdir=workdir, certs=certs, report=lambda s: None) as dep:
        dep.start_superlink()
        ids = {r: dep.register(keys[r][1]) for r in nodes}

        def start(region: str) -> None:
            dep.start_supernode(region, private_key=keys[region][0], node_config=nodes[region].node_config())

        for region in nodes:
            start(region)
        dep.wait_nodes(list(ids.values()), status="online")
        run_id = dep.submit(
            app_dir=default_app_dir(),
            run_config={"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "run")},
        )

        def chaos() -> None:
            eu = dep.supernodes["eu"]
            if "killed" not in seen:
                # Mid-round: eu has received its round-2 training message and started its ClientApp.
                log = eu.log_path.read_text(errors="replace")
                if log.count("Receiving: train message") >= 2 and log.rfind("Start `flwr-clientapp`") > log.rfind(
                    "Receiving: train message"
                ):
                    eu.kill()  # SIGKILL the SuperNode, its SuperExec and the running ClientApp at once
                    seen["killed"] = time.time()
                    seen["ledger_after_kill"] = _ledger(state, "eu")
            # The SuperLink refuses a node id it still thinks online: restart once the heartbeat expired.
            elif "restarted" not in seen and time.time() - float(seen.get("polled", 0.0)) > 10:  # type: ignore[arg-type]
                seen["polled"] = time.time()
                if dep.node_status().get(ids["eu"]) != "offline":
                    return
                seen["ledger_before_restart"] = _ledger(state, "eu")
                start("eu")
                dep.wait_nodes([ids["eu"]], status="online", timeout=240)
                seen["restarted"] = time.time()
                seen["ledger_after_rejoin"] = _ledger(state, "eu")

        status = dep.wait_run(run_id, timeout=RUN_TIMEOUT_S, poll_s=20, while_waiting=chaos)
    assert flower_processes_of(workdir) == []
    assert status["status"] == COMPLETED, status
    assert "killed" in seen and "restarted" in seen, seen

    summary = RunSummary.read(tmp_path / "run")
    ended = {r["round"]: summary.started + r["time_s"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    print(
        f"eu killed {float(seen['killed']) - summary.started:.0f} s into the run, round 2 ended at "  # type: ignore[arg-type]
        f"{ended[2] - summary.started:.0f} s, eu back at {float(seen['restarted']) - summary.started:.0f} s, "  # type: ignore[arg-type]
        f"round 3 ended at {ended[3] - summary.started:.0f} s"
    )
    assert summary.rounds_completed == 3
    # What happened, by region: no reply within the round timeout, or (once eu's heartbeat expired, which
    # can come first) the SuperLink's own "Node Unavailable" error reply for it.
    why = summary.events["failed"]["eu"]
    assert "(training)" in why and ("no reply within the round timeout" in why or "Node Unavailable" in why), why
    assert set(summary.events["failed"]) == {"eu"}  # named by region, never as the SuperLink's node id
    rows = {r["round"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert set(rows[1]["epsilon"]) == {"eu", "us"}
    assert "eu" in rows[2]["failed"] and set(rows[2]["epsilon"]) == {"us"}
    assert set(rows[3]["epsilon"]) == {"eu", "us"} and rows[3]["failed"] == {}  # it rejoined and trained again

    after_kill = seen["ledger_after_kill"]
    assert isinstance(after_kill, list) and len(after_kill) >= 1  # round 1's release is on disk
    # Nothing of the ledger was lost or reset by the crash and the restart (it is on disk, not in Flower's
    # in-memory node state) ...
    assert seen["ledger_before_restart"] == after_kill
    assert seen["ledger_after_rejoin"] == after_kill
    # ... and it grows again when the region trains in round 3.
    final = _ledger(state, "eu")
    assert len(final) > len(after_kill) and final[: len(after_kill)] == after_kill
    assert any(rnd == 3 and st == "sent" for _, rnd, st in final)


# --- 3. plaintext wire audit + a policy refusal ----------------------------------------------------


class RecordingProxy:
    """A loopback TCP proxy that keeps every byte the SuperNodes send to the SuperLink, one stream per
    connection (two SuperNodes' concurrent pushes would interleave mid-message in one buffer)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            stream = bytearray()
            with self.lock:
                self.streams.append(stream)
            threading.Thread(target=self._pump, args=(client, upstream, stream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @property
    def captured(self) -> bytes:
        """Every recorded connection's bytes, one after another (read under ``lock``)."""
        return b"".join(self.streams)

    def _pump(self, src: socket.socket, dst: socket.socket, stream: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if stream is not None:
                    with self.lock:
                        stream += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.server.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def proxy_factory() -> Iterator[list[RecordingProxy]]:
    made: list[RecordingProxy] = []
    yield made
    for p in made:
        p.close()


def test_wire_audit_plaintext_and_policy_refusal(tmp_path: Path, proxy_factory: list[RecordingProxy]) -> None:
    """PLAINTEXT ON PURPOSE: this one deployment runs without TLS so the bytes the regions send can be
    read; a proxy between the SuperNodes and the SuperLink records all of them. Flower allows SuperNode
    authentication only over TLS, so it is off here too; everything else (subprocess isolation, no
    runtime installation, the apps, the node configs and policies) is as in the TLS deployments."""
    from fedcrm.data.encode import FeatureEncoder
    from fedcrm.data.schema import load_schema
    from fedcrm.models import build_model, predict_proba, set_weights
    from fedcrm.region import NodeSettings, Region
    from fedcrm.runs import load_weights

    min_customers = 40
    policies = {
        "eu": _policy(tmp_path / "eu.yaml", min_customers=min_customers),
        "us": _policy(tmp_path / "us.yaml", min_customers=min_customers),
        "apac": _policy(tmp_path / "apac.yaml", min_customers=min_customers, denied_columns={"churn": ["nps_score"]}),
    }
    cfg_path = write_tiny_config(
        tmp_path,
        regions={"eu": 500, "us": 400, "apac": 300},
        overrides={"policies": {r: str(p) for r, p in policies.items()}, "federation.min_regions": 1},
    )
    cfg = load_config(cfg_path)
    workdir = tmp_path / "work"
    nodes = region_nodes(cfg, state_root=tmp_path / "state", data_dir=workdir / "data")
    with LocalDeployment(workdir=workdir, certs=None, tls=False, report=lambda s: None) as dep:
        dep.start_superlink()
        proxy = RecordingProxy(dep.port)
        proxy_factory.append(proxy)
        for n in nodes:
            dep.start_supernode(
                n.region, private_key=None, node_config=n.node_config(), superlink=f"127.0.0.1:{proxy.port}"
            )
        dep.wait_nodes(status="online", count=len(nodes))
        run_id = dep.submit(
            app_dir=default_app_dir(),
            run_config={"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "run")},
        )
        status = dep.wait_run(run_id, timeout=RUN_TIMEOUT_S)
    assert flower_processes_of(workdir) == []
    assert status["status"] == COMPLETED, status
    with proxy.lock:
        wire_bytes = bytes(proxy.captured)

    # -- the policy refusal, recorded in summary.json; the run went on without apac ------------------
    summary = RunSummary.read(tmp_path / "run")
    reason = wire.REFUSED_COLUMN  # the words ("column `nps_score` ...") stay in apac's audit log
    assert summary.events["refused"] == {"apac": reason}
    assert summary.privacy["apac"]["refused"] == reason
    assert set(summary.final_metrics_by_region) <= {"eu", "us"}
    assert PrivacyLedger.open(tmp_path / "state" / "apac", region="apac").events() == []

    # -- positive controls: the capture is readable and holds what the regions did send ----------------
    assert len(wire_bytes) > 10_000
    for expected in (b"hist-pos", b"num-examples", reason.encode(), b"/v1/fleet/push-messages"):
        assert expected in wire_bytes, expected
    train_counts = {r: summary.regions[r]["train"] for r in ("eu", "us")}
    for r, n in train_counts.items():
        assert struct.pack("<d", float(n)) in wire_bytes, f"{r}'s num-examples as a double is not in the capture"

    # -- every num-examples on the wire aggregates at least the policy's minimum of customers ---------
    sent_counts = metric_values(wire_bytes, b"num-examples")
    # eu and us: 2 training replies + the served model's evaluation each (per-round evaluation is off).
    # Flower 1.42's SuperLink stores records by content hash and asks a SuperNode only for the objects it
    # lacks (`objects_to_push`): two regions whose training metrics are equal (same declared size, σ and ε,
    # as here: both declare 300) send that record's bytes once. So a round's training count appears once
    # or twice; each region's noisy evaluation count once.
    assert len(sent_counts) >= 4, sent_counts
    # A training reply's count is the region's declared size; an evaluation reply's is a DP-noised count
    # of its hold-out (any value: one CI run saw 24.2), which no policy minimum bounds.
    training = [c for c in sent_counts if c in set(train_counts.values())]
    assert len(training) >= 2 and min(training) >= min_customers, sent_counts
    for row in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        for r, m in row["regions"].items():
            assert m["customers"] >= min_customers, (row["round"], r, m)

    # -- no customer id, no raw row, no encoded feature row, no per-customer score ------------------
    assert re.search(rb"(eu|us|apac)-\d{7}", wire_bytes) is None
    schema = load_schema(cfg.schema_path)
    n_features = len(FeatureEncoder(schema).feature_names)
    models = []
    for path in sorted((tmp_path / "run" / "checkpoints").glob("*.npz")):  # every round's global model
        m = build_model(cfg.model, n_features=n_features, seed=0)
        set_weights(m, load_weights(path))
        models.append(m)
    assert models
    for n in nodes:
        for line in n.data_path.read_text().splitlines()[1:]:
            row = line.split(",", 1)[1]  # the customer's values without the id
            assert row.encode() not in wire_bytes
        scratch_state = tmp_path / "scratch" / n.region  # a throwaway ledger: this only reads the table
        scratch = Region(
            NodeSettings(region=n.region, data_path=n.data_path, state_dir=scratch_state, schema_path=cfg.schema_path)
        )
        x = scratch.load(cfg, schema).x.astype(np.float32)
        for i in range(len(x)):
            assert x[i].tobytes() not in wire_bytes and x[i].astype(np.float64).tobytes() not in wire_bytes
        for model in models:
            scores = predict_proba(model, x).astype(np.float64)
            for i, s in enumerate(scores):
                assert struct.pack("<d", s) not in wire_bytes and repr(float(s)).encode() not in wire_bytes
                if i + 1 < len(scores):  # a vector of scores as float32
                    assert scores[i : i + 2].astype(np.float32).tobytes() not in wire_bytes


# --- 4. Ctrl-C stops everything ---------------------------------------------------------------------


def test_ctrl_c_during_a_run_stops_every_process(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import threading

    # Many rounds, so that the run is still going when Ctrl-C comes (2 rounds can finish first).
    cfg_path = write_tiny_config(tmp_path, regions={"eu": 300, "us": 300}, overrides={"training.rounds": 200})
    workdir = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "fedcrm.cli",
        "deploy",
        "local",
        "--config",
        str(cfg_path),
        "--workdir",
        str(workdir),
        "--state",
        str(tmp_path / "state"),
        "--out",
        str(tmp_path / "run"),
    ]
    # Ctrl-C as a terminal delivers it, to a command that has SIGINT's default action. A test run started
    # in the background of a non-interactive shell (`cmd &`, as a CI script may do) ignores SIGINT, and
    # its children inherit that: `deploy local` then never saw the signal (seen: SigIgn had SIGINT set, the
    # command still waiting for its run minutes later). That was the test's harness, not the command.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - no threads here
    )
    out: list[str] = []
    submitted = threading.Event()

    def read() -> None:  # drain the output all along: a full pipe would block the command mid-stop
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if "submitted" in line:
                submitted.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not submitted.wait(timeout=1):
            if proc.poll() is not None:
                reader.join(timeout=10)
                pytest.fail("the deployment ended before the run was submitted:\n" + "".join(out))
        assert len(flower_processes_of(workdir)) >= 5  # SuperLink, 2 SuperNodes and their SuperExecs at least
        proc.send_signal(signal.SIGINT)
        # Stopping is bounded: each of the six components gets 10 s after SIGTERM, then SIGKILL and 15 s.
        proc.wait(timeout=6 * 25 + 30)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(out)[-3000:]
    assert "every process of the deployment was stopped" in "".join(out)
    assert flower_processes_of(workdir) == []
