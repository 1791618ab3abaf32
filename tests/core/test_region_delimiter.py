"""A region's own CSV delimiter: ``regions: {eu: {path: ..., delimiter: ";"}}`` in the config (the plain
``eu: path`` form stays), the ``delimiter`` key of a SuperNode's node config, used by the region's load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.errors import ConfigError
from fedcrm.fl.simulation import simulated_nodes
from fedcrm.region import NodeSettings


def _config(tmp_path: Path, regions: dict) -> Path:
    path = write_tiny_config(tmp_path, regions={"eu": 60, "us": 60})
    doc = yaml.safe_load(path.read_text())
    doc["regions"] = regions(doc["regions"]) if callable(regions) else regions
    path.write_text(yaml.safe_dump(doc))
    return path


def test_region_entries_take_a_path_and_a_delimiter_next_to_plain_paths(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, lambda r: {"eu": {"path": r["eu"], "delimiter": ";"}, "us": r["us"]}))
    assert cfg.regions["eu"].name == "eu.csv" and cfg.regions["us"].name == "us.csv"
    assert cfg.region_delimiters == {"eu": ";"}
    nodes = {n["region"]: n for n in simulated_nodes(cfg, state_root=tmp_path / "state").values()}
    assert nodes["eu"]["delimiter"] == ";" and "delimiter" not in nodes["us"]
    assert NodeSettings.from_node_config(nodes["eu"]).delimiter == ";"
    assert NodeSettings.from_node_config(nodes["us"]).delimiter is None
    # The resolved config (what config.yaml records) loads back to the same thing.
    again = type(cfg).model_validate(cfg.to_dict())
    assert again.region_delimiters == {"eu": ";"} and again.regions == cfg.regions


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file": "eu.csv"}, r"regions.eu: expected a data file path or \{path: ..., delimiter: ...\}"),
        ({"path": "eu.csv", "delimiter": ";;"}, r"a delimiter is one character"),
    ],
)
def test_a_bad_region_entry_is_refused(tmp_path: Path, entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, lambda r: {"eu": entry, "us": r["us"]}))


def test_the_regions_load_reads_its_file_with_the_node_configs_delimiter(tmp_path: Path) -> None:
    """A ':'-separated export (no detection would guess it) loads only with the node's delimiter, and
    gives the same customers as the comma file."""
    import numpy as np

    from fedcrm.data.io import RowBoundedCache
    from fedcrm.data.schema import load_schema
    from fedcrm.errors import DataError
    from fedcrm.region import Region

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300}))
    schema = load_schema(cfg.schema_path)
    text = cfg.regions["eu"].read_text()
    assert ":" not in text
    colon = tmp_path / "eu-colon.csv"
    colon.write_text(text.replace(",", ":"))
    node = {
        "region": "eu",
        "data-path": str(colon),
        "state-dir": str(tmp_path / "state" / "eu"),
        "schema-path": str(cfg.schema_path),
    }
    cache = RowBoundedCache()
    with pytest.raises(DataError, match="wrong delimiter"):
        Region(NodeSettings.from_node_config(node), cache=cache).load(cfg, schema)
    got = Region(NodeSettings.from_node_config(node | {"delimiter": ":"}), cache=cache).load(cfg, schema)
    plain = NodeSettings(
        region="eu", data_path=cfg.regions["eu"], state_dir=tmp_path / "state" / "eu", schema_path=cfg.schema_path
    )
    want = Region(plain, cache=RowBoundedCache()).load(cfg, schema)
    assert list(got.ids) == list(want.ids) and np.array_equal(got.x, want.x)


def test_data_validate_says_which_delimiter_it_read_with(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from fedcrm.cli import app

    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 60}))
    colon = tmp_path / "eu-colon.csv"
    colon.write_text(cfg.regions["eu"].read_text().replace(",", ":"))
    runner = CliRunner()
    res = runner.invoke(
        app, ["data", "validate", str(colon), "--schema", str(cfg.schema_path), "--delimiter", ":", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert {k: json.loads(res.stdout)[k] for k in ("delimiter", "delimiter_from")} == {
        "delimiter": ":",
        "delimiter_from": "region",
    }
    res = runner.invoke(app, ["data", "validate", str(cfg.regions["eu"]), "--schema", str(cfg.schema_path)])
    assert res.exit_code == 0 and "read with delimiter ',' (the schema's)" in res.stdout, res.output


def test_the_plan_sent_to_regions_carries_no_regions_file_format(tmp_path: Path) -> None:
    import json

    from fedcrm import wire
    from fedcrm.fl.codec import plan_config

    cfg = load_config(_config(tmp_path, lambda r: {"eu": {"path": r["eu"], "delimiter": ";"}, "us": r["us"]}))
    plan = json.loads(str(plan_config(cfg, schema_text="x", run_id="r")[wire.EXPERIMENT]))
    assert plan["region_delimiters"] == {}
    assert type(cfg).model_validate(plan | {"schema": str(cfg.schema_path)}).region_delimiters == {}


def test_every_region_settings_builder_carries_the_regions_delimiter(tmp_path: Path) -> None:
    """Only the simulation kept it: the one-host deployment's SuperNodes and the centralised baseline (like
    a retrain) built a region's settings without it, and could not read a ':'-separated file."""
    from fedcrm.baseline import run_centralised
    from fedcrm.deploy.topology import region_nodes
    from fedcrm.node_settings import region_settings

    def colon(regions: dict) -> dict:
        path = Path(regions["eu"])
        path.with_name("eu-colon.csv").write_text(path.read_text().replace(",", ":"))
        return {"eu": {"path": str(path.with_name("eu-colon.csv")), "delimiter": ":"}, "us": regions["us"]}

    cfg = load_config(_config(tmp_path, colon))
    (node,) = [n for n in region_nodes(cfg, state_root=tmp_path / "state", data_dir=tmp_path / "d") if n.region == "eu"]
    assert node.node_config()["delimiter"] == ":"
    assert NodeSettings.from_node_config(node.node_config()) == node
    assert region_settings(cfg, state_root=tmp_path / "state")["eu"] == node  # the simulation's, the retrain's
    summary = run_centralised(cfg, run_dir=tmp_path / "baseline", state_root=tmp_path / "state")
    assert summary.regions["eu"]["train"] > 0
