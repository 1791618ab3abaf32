"""What a message costs must not grow with the federation (issue 19: 1,000 tenants on one machine).

Each of these grew with the number of regions before, per message or per node: the simulation's
per-message pickle of the ClientApp, the node registry's recording, and the plan each region parses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray import cloudpickle

from fedcrm.errors import ConfigError
from fedcrm.fl import codec
from fedcrm.fl.client import build_client_app
from fedcrm.fl.registry import NodeRegistry
from fedcrm.fl.simulation import poll_interval, simulated_node_config, write_node_table


def _nodes(n: int, root: Path) -> dict[int, dict[str, str]]:
    return {
        i: {"region": f"region-{i:04d}", "data-path": str(root / f"region-{i:04d}.csv"), "state-dir": str(root / "s")}
        for i in range(n)
    }


def test_the_pickled_client_app_does_not_grow_with_the_regions(tmp_path: Path) -> None:
    # The simulation pickles the ClientApp, mods included, to its actors with every message.
    sizes = {}
    for n in (10, 1000):
        table = write_node_table(_nodes(n, tmp_path), state_root=tmp_path / f"state-{n}")
        app = build_client_app(mods=[simulated_node_config(table, registry=NodeRegistry(tmp_path / f"reg-{n}"))])
        sizes[n] = len(cloudpickle.dumps(app))
        # The file holds every region's node config, read back as written.
        assert json.loads(table.read_text())[str(n - 1)]["region"] == f"region-{n - 1:04d}"
    assert sizes[1000] <= sizes[10] + 64, sizes  # the path's length may differ; the table is not in it


def test_node_table_is_content_addressed_and_never_rewritten(tmp_path: Path) -> None:
    a = write_node_table(_nodes(3, tmp_path), state_root=tmp_path)
    mtime = a.stat().st_mtime_ns
    assert write_node_table(_nodes(3, tmp_path), state_root=tmp_path) == a
    assert a.stat().st_mtime_ns == mtime
    assert write_node_table(_nodes(4, tmp_path), state_root=tmp_path) != a


def test_recording_a_node_reads_its_region_index_not_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = NodeRegistry(tmp_path / "reg")
    for i in range(50):
        reg.record(node_id=1000 + i, region=f"r{i}")
    reads: list[Path] = []
    real = NodeRegistry._read

    def counting(self: NodeRegistry, path: Path) -> object:
        reads.append(path)
        return real(self, path)

    monkeypatch.setattr(NodeRegistry, "_read", counting)
    reg.record(node_id=2000, region="r7")  # r7's key changed: a new node id
    assert len(reads) <= 3, reads
    monkeypatch.undo()
    regions = reg.regions()
    assert regions[2000] == "r7" and 1007 not in regions  # one node per region: the earlier one is dropped
    assert len(regions) == 50
    with pytest.raises(ConfigError, match="already registered for region `r7`"):
        reg.record(node_id=2000, region="r8")


def test_a_registry_written_before_the_index_is_still_one_node_per_region(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    for node, region in ((1, "eu"), (2, "us")):  # entries as the registry wrote them before the index
        (d / f"node-{node}.json").write_text(json.dumps({"node_id": node, "region": region, "public_key_sha256": None}))
    reg = NodeRegistry(d)
    reg.record(node_id=3, region="eu")
    assert reg.regions() == {2: "us", 3: "eu"}


def test_the_plan_is_parsed_once_per_process_for_the_same_text(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = codec.schema_from_text

    def counting(text: str, *, source: str) -> object:
        calls.append(text)
        return real(text, source=source)

    monkeypatch.setattr(codec, "schema_from_text", counting)
    codec._parse_plan.cache_clear()
    from fedcrm.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    plan = codec.plan_config(cfg, schema_text=cfg.schema_path.read_text(), run_id="r1")
    first = codec.read_plan(plan)
    second = codec.read_plan(codec.plan_config(cfg, schema_text=cfg.schema_path.read_text(), run_id="r2"))
    assert len(calls) == 1 and first[1] is second[1] and second[2] == "r2"
    codec.read_plan(codec.plan_config(cfg, schema_text=cfg.schema_path.read_text() + "\n", run_id="r3"))
    assert len(calls) == 2  # another text is parsed (and validated) afresh


def test_the_server_polls_less_often_as_regions_grow() -> None:
    assert poll_interval(3) == 0.01
    assert poll_interval(300) == pytest.approx(0.03)
    assert poll_interval(1000) == 0.1 == poll_interval(5000)
