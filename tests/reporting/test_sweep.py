"""Sweeps: grid expansion, the `none` ε, independent cells, the results table, resume after a failure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PERMISSIVE_POLICY, write_tiny_config

from fedcrm.config import load_config
from fedcrm.errors import ConfigError
from fedcrm.sweep import SweepSpec, cell_config, expand_cells, load_sweep, run_sweep


def _spec(tmp_path: Path, **extra: object) -> Path:
    # The regions consent to non-private cells, and their evaluation answers (a hold-out's releases) are
    # noisy enough to stay below the DP cells' target: the ε compared below is the worst-off customer's.
    policy = tmp_path / "research-policy.yaml"
    policy.write_text(yaml.safe_dump({**yaml.safe_load(PERMISSIVE_POLICY.read_text()), "evaluation_noise": 6.0}))
    base = write_tiny_config(
        tmp_path,
        regions={"eu": 400, "us": 300},
        overrides={"training.rounds": 1, "policies": {"eu": str(policy), "us": str(policy)}},
    )
    doc = {
        "name": "t",
        "base": str(base),
        "grid": {"privacy.target_epsilon": [2, "none"]},
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "sweeps"),
    } | extra
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_grid_times_seeds_and_none_means_no_dp(tmp_path: Path) -> None:
    spec = load_sweep(_spec(tmp_path, baselines=["centralised"]))
    cells = expand_cells(spec)
    assert [c.id for c in cells] == [
        "target_epsilon=2.0_seed=0",
        "target_epsilon=2.0_seed=1",
        "target_epsilon=none_seed=0",
        "target_epsilon=none_seed=1",
        "centralised_seed=0",
        "centralised_seed=1",
    ]
    base = load_config(spec.base)
    none = cell_config(spec, base, cells[2], sweep_dir=tmp_path)
    assert none.privacy.mode == "none" and none.privacy.target_epsilon is None
    dp = cell_config(spec, base, cells[1], sweep_dir=tmp_path)
    assert dp.privacy.mode == "sample_dp" and dp.privacy.target_epsilon == 2.0 and dp.seed == 1
    assert dp.name != none.name  # the shared engine tells cells apart by name


def test_mapping_values_are_override_bundles_with_labels(tmp_path: Path) -> None:
    spec = load_sweep(
        _spec(
            tmp_path,
            grid={
                "privacy": [
                    {"label": "client", "privacy.mode": "client_dp", "privacy.client_noise_multiplier": 2.0},
                    {"label": "off", "privacy.mode": "none", "privacy.target_epsilon": None},
                ]
            },
            seeds=[3],
        )
    )
    cells = expand_cells(spec)
    assert [c.params["privacy"] for c in cells] == ["client", "off"]
    cfg = cell_config(spec, load_config(spec.base), cells[0], sweep_dir=tmp_path)
    assert cfg.privacy.mode == "client_dp" and cfg.privacy.client_noise_multiplier == 2.0 and cfg.seed == 3


def test_unknown_grid_key_names_the_cell(tmp_path: Path) -> None:
    spec = load_sweep(_spec(tmp_path, grid={"training.roundz": [1]}))
    with pytest.raises(ConfigError, match="training.roundz"):
        cell_config(spec, load_config(spec.base), expand_cells(spec)[0], sweep_dir=tmp_path)


def test_sweep_spec_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seedz"):
        load_sweep(_spec(tmp_path, seedz=[1]))
    assert SweepSpec(name="x", base=Path("b")).engine == "shared"


@pytest.mark.slow  # several sweep cells and two engine start-ups
def test_failed_cell_is_recorded_and_resume_reruns_only_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One engine for all cells; a cell whose region data vanished fails, the others finish; after the
    data is back, a second invocation runs only the failed cell and leaves the done ones untouched."""
    spec = load_sweep(_spec(tmp_path, baselines=["centralised"]))
    sweep_dir = tmp_path / "out"
    # Make exactly one cell fail: its config gets a policy that refuses the purpose at every region.
    policy = tmp_path / "deny.yaml"
    policy.write_text(yaml.safe_dump({"allowed_purposes": ["propensity"]}))
    failing = "target_epsilon=2.0_seed=1"

    import fedcrm.sweep as sweep_mod

    original = sweep_mod.cell_config

    def patched(spec_, base, cell, *, sweep_dir):  # type: ignore[no-untyped-def]
        cfg = original(spec_, base, cell, sweep_dir=sweep_dir)
        if cell.id == failing and (tmp_path / "break").exists():
            return cfg.model_copy(update={"policies": {r: policy for r in cfg.regions}})
        return cfg

    (tmp_path / "break").touch()
    monkeypatch.setattr(sweep_mod, "cell_config", patched)
    df = run_sweep(spec, out_dir=sweep_dir, report=lambda s: None)
    status = dict(zip(df["cell"], df["status"], strict=True))
    assert status.pop(failing) == "failed"
    assert set(status.values()) == {"done"}
    err = df.set_index("cell").loc[failing, "error"]
    assert "purpose" in err or "region" in err
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "results.parquet").exists()
    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert len(table) == 6 and {"auc", "epsilon_eu", "epsilon_us", "wall_time_s", "seed", "status"} <= set(table)
    done_dp = table[(table["cell"] == "target_epsilon=2.0_seed=0")].iloc[0]
    assert 0 < done_dp["epsilon_eu"] <= 2.0 + 1e-6  # its own ledger: ε of this cell only
    mtimes = {c: (sweep_dir / "runs" / c / "summary.json").stat().st_mtime_ns for c in status}

    (tmp_path / "break").unlink()
    df2 = run_sweep(spec, out_dir=sweep_dir, report=lambda s: None)
    assert set(df2["status"]) == {"done"}
    assert {c: (sweep_dir / "runs" / c / "summary.json").stat().st_mtime_ns for c in status} == mtimes
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert [inv["cells_run"] for inv in meta["invocations"]] == [6, 1]
    # Every cell kept its own state folder: ε never composed across cells.
    eps = df2.set_index("cell")["epsilon_max"]
    assert eps["target_epsilon=2.0_seed=0"] <= 2.0 + 1e-6 and eps["target_epsilon=2.0_seed=1"] <= 2.0 + 1e-6
    assert eps["target_epsilon=none_seed=0"] == float("inf")  # released without DP: no bound holds
