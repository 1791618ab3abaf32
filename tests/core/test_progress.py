"""Progress bars: drawn for a person at a terminal, absent for scripts; a sweep reports each cell and a
retrain each training round (rounds × shards retrained)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_config
from rich.console import Console

from fedcrm.progress import ProgressBar, counting_rounds, interactive
from fedcrm.sweep import load_sweep, run_sweep

RETRAIN_LOG = [
    "retraining shard(s) [0, 2] of 4 for 1 request(s): model version 1 -> 2",
    *[f"round {r:>3}/3 shard {k + 1}/4:  ε spent: eu 0.5  (1.0s)" for k in (0, 2) for r in (1, 2, 3)],
]


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_retrain_bar_counts_rounds_times_shards_and_keeps_the_log_lines() -> None:
    console, buf = _terminal()
    with ProgressBar(description="retrain", total=None, console=console, enabled=True) as bar:
        report = counting_rounds(bar)
        for line in RETRAIN_LOG[:4]:
            report(line)
        assert (bar.completed, bar.total) == (3, 6)  # 3 rounds × 2 stale shards, half done
        for line in RETRAIN_LOG[4:]:
            report(line)
        assert (bar.completed, bar.total) == (6, 6)
    text = buf.getvalue()
    assert all(line in text for line in RETRAIN_LOG)
    assert "6/6" in text  # the bar was drawn (MofN column)


def test_no_bar_when_nobody_watches() -> None:
    assert not interactive()  # pytest captures stdout: not a terminal
    console, buf = _terminal()
    with ProgressBar(description="retrain", total=None, console=console) as bar:
        report = counting_rounds(bar)
        for line in RETRAIN_LOG:
            report(line)
    assert buf.getvalue().count("\n") == len(RETRAIN_LOG)  # the log lines, nothing else
    assert "6/6" not in buf.getvalue() and "\x1b[?25l" not in buf.getvalue()  # no bar, no cursor hiding


def test_sweep_reports_progress_after_every_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = write_tiny_config(tmp_path, regions={"eu": 200})
    p = tmp_path / "sweep.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "base": str(base),
                "grid": {"privacy.target_epsilon": [1, 2]},
                "seeds": [0, 1],
                "output_dir": str(tmp_path / "sweeps"),
                "engine": "per_cell",
            }
        )
    )
    import fedcrm.fl.simulation as simulation

    def no_engine(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("no engine in this test")  # each cell fails at once: only the hook is measured

    monkeypatch.setattr(simulation, "run_simulated", no_engine)
    calls: list[tuple[int, int]] = []
    df = run_sweep(
        load_sweep(p),
        out_dir=tmp_path / "out",
        report=lambda s: None,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert set(df["status"]) == {"failed"}
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
