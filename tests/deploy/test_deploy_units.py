"""Fast checks of the deployment pieces that need no SuperLink: the app bundle, the ServerApp's paths,
names-only configs, node configs, the process supervisor, the outgoing check and the GuardedStrategy's
record of silent regions."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_tiny_config

from fedcrm import wire
from fedcrm.config import NODE_PATH_PLACEHOLDER, load_config
from fedcrm.deploy.local import Component, free_port, node_config_arg, region_nodes
from fedcrm.errors import ConfigError


def test_fab_holds_code_and_configs_only() -> None:
    """What `flwr run` ships: small, no data, no run folders, no state, no tests (data/ etc. are gitignored).

    Nor fedcrm itself: the package that enforces a region's policy and budget is installed at each host,
    so a bundle cannot replace those safeguards with its own copy.
    """
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 2_000_000, f"FAB is {len(fab)} bytes"
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/server_app.py" in names and "clients/client_app.py" in names
    assert "configs/schemas/synthetic_crm.yaml" in names
    assert not [n for n in names if n.startswith("fedcrm/") or "/fedcrm/" in n], names
    top = {n.split("/")[0] for n in names}
    assert top <= {"server", "clients", "configs", "pyproject.toml", ".info"}, top
    assert not [n for n in names if n.endswith((".csv", ".parquet", ".db", ".npz", ".key"))]


def test_server_app_resolves_the_config_against_the_app_dir_not_the_cwd(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from server.server_app import APP_DIR, resolve_app_path

    monkeypatch.chdir(tmp_path)  # in deployment the cwd is wherever the SuperLink was started
    assert APP_DIR == REPO
    assert resolve_app_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"
    assert resolve_app_path("configs/demo.yaml", app_dir=tmp_path / "app") == tmp_path / "app" / "configs" / "demo.yaml"
    assert resolve_app_path(str(tmp_path / "x.yaml")) == tmp_path / "x.yaml"
    load_config(resolve_app_path("configs/demo.yaml"))  # the default run config loads from anywhere


def test_pyproject_declares_every_run_config_key_the_server_reads() -> None:
    import tomllib

    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert conf["experiment-config"] == "configs/demo.yaml"
    assert conf["run-dir"] == ""


def test_a_config_may_name_its_regions_without_paths(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_tiny_config(tmp_path).read_text())
    raw["regions"] = ["eu", "us"]
    (tmp_path / "names.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "names.yaml")
    assert list(cfg.regions) == ["eu", "us"]
    assert all(p.parts[0] == NODE_PATH_PLACEHOLDER for p in cfg.regions.values())  # not made absolute
    # ... but one host cannot play the data owners without files:
    with pytest.raises(ConfigError, match="have no data file"):
        region_nodes(cfg, state_root=tmp_path / "state", data_dir=tmp_path / "d")


def test_region_nodes_carry_each_owners_settings(tmp_path: Path) -> None:
    policy = tmp_path / "eu-policy.yaml"
    policy.write_text("min_customers: 30\n")
    cfg = load_config(write_tiny_config(tmp_path, overrides={"policies": {"eu": str(policy)}}))
    nodes = {n.region: n for n in region_nodes(cfg, state_root=tmp_path / "state", data_dir=tmp_path / "d")}
    assert nodes["eu"].node_config() == {
        "region": "eu",
        "data-path": str((tmp_path / "data" / "eu.csv").resolve()),
        "state-dir": str((tmp_path / "state" / "eu").resolve()),
        "policy-path": str(policy.resolve()),
        "schema-path": str(cfg.schema_path.resolve()),  # the owner's copy, checked against every plan
    }
    assert "policy-path" not in nodes["us"].node_config()


def test_node_config_argument_is_valid_toml_for_odd_paths() -> None:
    import tomllib

    values = {"region": "eu", "data-path": '/d/with space/"q"\\x.csv'}
    text = node_config_arg(values)
    parsed = tomllib.loads(text.replace('" ', '"\n'))  # Flower splits on spaces between pairs
    assert parsed == values
    with pytest.raises(ConfigError):
        node_config_arg({"bad key": "x"})


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_component_stop_reaches_a_grandchild_in_its_own_session(tmp_path: Path) -> None:
    """As the SuperLink's SuperExec does: a child started with start_new_session escapes the group."""
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    log = tmp_path / "x.log"
    popen = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL)
    comp = Component(name="x", popen=popen, log_path=log, groups={popen.pid})
    deadline = time.time() + 30
    while time.time() < deadline:
        comp.refresh_groups()
        if len(comp.groups) == 2:
            break
        time.sleep(0.2)
    assert len(comp.groups) == 2, "the grandchild's own session was not found"
    members = comp.members()
    assert len(members) == 2
    assert comp.stop(grace_s=5) == []
    assert comp.members() == []


@pytest.mark.usefixtures("task_identity")
def test_a_forbidden_key_is_blocked_not_sent_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The outgoing check on the real reply path (`answer`): a handler tries to send a per-customer score."""
    from conftest import plan_message, write_tiny_config
    from flwr.app import Context, MetricRecord, RecordDict

    from fedcrm.config import load_config
    from fedcrm.fl import client as client_module

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 60}))

    def leaky(region, msg):  # type: ignore[no-untyped-def]
        return RecordDict(
            {
                wire.METRICS: MetricRecord({"customer-eu-0000007-score": 0.93, wire.NUM_EXAMPLES: 60.0}),
                wire.STATUS: client_module.status(region.name, wire.OUTCOME_OK),
            }
        )

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"region": "eu", "data-path": str(cfg.regions["eu"]), "state-dir": str(tmp_path / "st")},
        state=RecordDict(),
        run_config={},
    )
    with caplog.at_level(logging.ERROR, logger="fedcrm.region"):
        reply = client_module.answer(leaky, plan_message(cfg), ctx)  # what every handler's reply goes through
    assert set(reply.keys()) == {wire.STATUS}  # the metrics record did not go out at all
    st = reply[wire.STATUS]
    assert st[wire.OUTCOME] == wire.OUTCOME_FAILED and st[wire.KIND] == "BlockedReply"
    assert "0.93" not in str(reply) and "customer-eu-0000007-score" not in str(reply)
    assert "customer-eu-0000007-score" in caplog.text and "blocked" in caplog.text


def _guard(seen: list, *, node_regions: dict[int, str], wait_for_regions_s: float = 0.0):  # noqa: ANN202
    """fedcrm's guard around plain FedAvg, recording each round's events in ``seen``."""
    from flwr.serverapp.strategy import FedAvg

    from fedcrm.fl.strategy import GuardedStrategy

    return GuardedStrategy(
        FedAvg(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1),
        min_regions=1,
        excluded_nodes=set(),
        on_round=lambda rnd, ev, per_region, pooled: seen.append(ev),
        node_regions=node_regions,
        wait_for_regions_s=wait_for_regions_s,
    )


class _RejoiningGrid:
    """A grid on which node 11 (eu) is offline for the first ``absent_calls`` looks, then back."""

    def __init__(self, *, absent_calls: int) -> None:
        self.calls = 0
        self.absent_calls = absent_calls

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return [22] if self.calls <= self.absent_calls else [11, 22]


@pytest.mark.usefixtures("task_identity")
def test_a_round_waits_for_a_restarted_region_and_names_one_that_stays_away() -> None:
    """Flower samples a round among the nodes online when it starts: a SuperNode restarted after a crash
    is back only after the round it was in has ended. The guard waits (bounded) for the regions that
    passed pre-flight, and names the ones still missing instead of leaving them out silently."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord

    from fedcrm.fl.codec import to_record

    arrays: ArrayRecord = to_record({"w": np.zeros((2,), dtype=np.float32)})
    # eu comes back while the round waits: it is sent its training message, nothing is marked failed.
    waiting = _guard([], node_regions={11: "eu", 22: "us"}, wait_for_regions_s=30.0)
    grid = _RejoiningGrid(absent_calls=3)
    t0 = time.monotonic()
    sent = list(waiting.configure_train(3, arrays, ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 22]
    assert waiting.events[3].failed == {} and time.monotonic() - t0 < 10  # it stopped waiting once eu was back
    # Without a wait (the default), the same race leaves eu out, and the round's events say so.
    eager = _guard([], node_regions={11: "eu", 22: "us"})
    sent = list(eager.configure_train(3, arrays, ConfigRecord({}), _RejoiningGrid(absent_calls=3)))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in sent] == [22]
    assert (
        list(eager.events[3].failed) == ["eu"]
        and "not connected when the round started" in (eager.events[3].failed["eu"])
    )
    # A region that never comes back: the wait is bounded, the round goes on with the others.
    bounded = _guard([], node_regions={11: "eu", 22: "us"}, wait_for_regions_s=1.0)
    t0 = time.monotonic()
    sent = list(bounded.configure_train(3, arrays, ConfigRecord({}), _RejoiningGrid(absent_calls=10**6)))  # type: ignore[arg-type]
    assert 1.0 <= time.monotonic() - t0 < 5
    assert [m.metadata.dst_node_id for m in sent] == [22] and "waited 1 s" in bounded.events[3].failed["eu"]
    # A pre-flight error reply comes from the SuperLink's own node id (1): that is no region to wait for.
    superlink_error = _guard([], node_regions={1: "node-1", 11: "eu", 22: "us"}, wait_for_regions_s=30.0)
    t0 = time.monotonic()
    list(superlink_error.configure_train(3, arrays, ConfigRecord({}), _RejoiningGrid(absent_calls=0)))  # type: ignore[arg-type]
    assert superlink_error.events[3].failed == {} and time.monotonic() - t0 < 10


@pytest.mark.usefixtures("task_identity")
def test_a_region_that_never_replies_is_named_in_the_round_events() -> None:
    """Flower passes on only the replies that came: the guard names the nodes that were asked and stayed silent."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedcrm.fl.strategy import RoundEvents

    seen: list[RoundEvents] = []
    guard = _guard(seen, node_regions={11: "eu", 22: "us"})

    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [11, 22]

    import numpy as np

    from fedcrm.fl.codec import to_record

    arrays: ArrayRecord = to_record({"w": np.zeros((2,), dtype=np.float32)})
    sent = list(guard.configure_train(1, arrays, ConfigRecord({}), FakeGrid()))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 22]
    reply = Message(
        content=RecordDict(
            {
                wire.ARRAYS: to_record({"w": np.ones((2,), dtype=np.float32)}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 50.0}),
                wire.STATUS: ConfigRecord({wire.REGION: "us", wire.OUTCOME: wire.OUTCOME_OK}),
            }
        ),
        reply_to=sent[[m.metadata.dst_node_id for m in sent].index(22)],
    )
    assert reply.metadata.src_node_id == 22  # a reply comes from the node the message was sent to
    guard.aggregate_train(1, [reply])
    guard.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid())  # type: ignore[arg-type]
    guard.aggregate_evaluate(1, [])
    assert seen and seen[0].failed == {
        "eu": "no reply within the round timeout (training)",
        "us": ("no reply within the round timeout (evaluation)"),
    }


def test_certs_commands_split_the_operators_files_from_the_data_owners_key(tmp_path: Path) -> None:
    """`certs node-key` on the owner's host; `certs` (operator) takes only the public key."""
    import stat

    from typer.testing import CliRunner

    from fedcrm.cli import app

    owner = CliRunner().invoke(app, ["certs", "node-key", "--out", str(tmp_path / "eu-host"), "--region", "eu"])
    assert owner.exit_code == 0, owner.output
    private, public = tmp_path / "eu-host" / "supernode-eu.key", tmp_path / "eu-host" / "supernode-eu.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().split()[0] in owner.output  # the line to send to the operator
    args = [
        "certs",
        "--out",
        str(tmp_path / "c"),
        "--node-public-key",
        f"eu={public}",
        "--host",
        "link.example.org",
        "--ca-valid-days",
        "365",
        "--valid-days",
        "90",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert "keep it offline" in res.output and "valid 365 days" in res.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    bad = CliRunner().invoke(app, ["certs", "--out", str(tmp_path / "d"), "--node-public-key", str(public)])
    assert bad.exit_code == 2 and "REGION=PATH" in bad.output


def test_register_node_records_the_region_a_node_id_speaks_for(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.fl.registry import NodeRegistry

    reg = tmp_path / "registry"
    res = CliRunner().invoke(
        app, ["deploy", "register-node", "--registry", str(reg), "--region", "eu", "--node-id", "7"]
    )
    assert res.exit_code == 0, res.output
    assert NodeRegistry(reg).regions() == {7: "eu"}
    moved = CliRunner().invoke(
        app, ["deploy", "register-node", "--registry", str(reg), "--region", "us", "--node-id", "7"]
    )
    assert moved.exit_code == 2 and "already registered for region `eu`" in moved.output


@pytest.mark.usefixtures("task_identity")
def test_the_superlinks_node_unavailable_reply_is_named_by_region() -> None:
    """A node whose heartbeat stopped gets an error reply from the SuperLink (its own node id), not from
    the node: the guard names the region it was meant for."""
    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedcrm.fl.codec import to_record
    from fedcrm.fl.strategy import RoundEvents

    seen: list[RoundEvents] = []
    guard = _guard(seen, node_regions={11: "eu"})

    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [11]

    arrays = to_record({"w": np.zeros((2,), dtype=np.float32)})
    sent = list(guard.configure_evaluate(1, arrays, ConfigRecord({}), FakeGrid()))  # type: ignore[arg-type]
    for m in sent:  # what Flower's grid does when it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    error = create_message_error_unavailable_res_message(sent[0].metadata, "node_unavail")
    assert error.metadata.src_node_id != 11
    guard.aggregate_evaluate(1, [error])
    assert list(seen[0].failed) == ["eu"]
    assert "Node Unavailable" in seen[0].failed["eu"] and "(evaluation)" in seen[0].failed["eu"]
