"""Reports: plots checked for content (axes labelled, one line per series), the model card, and the
HTML page rendered by headless Chromium with every plot image loaded."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedcrm.report import (
    RunView,
    model_card,
    plot_by_parameter,
    plot_epsilon_per_round,
    plot_privacy_utility,
    plot_utility_per_round,
    privacy_utility_table,
    series_lines,
    write_report,
)
from fedcrm.sweep import write_results

REGIONS = ("eu", "us", "apac")


def _rows(rounds: int = 4) -> list[dict]:
    """metrics.jsonl rows as fedcrm.fl.server writes them."""
    rows = []
    for r in range(1, rounds + 1):
        regions = {g: {"auc": 0.6 + 0.02 * r + 0.01 * i, "epsilon": 0.5 * r} for i, g in enumerate(REGIONS)}
        rows.append(
            {
                "round": r,
                "shard": 0,
                "time_s": float(r),
                "pooled": {"auc": 0.62 + 0.03 * r},
                "regions": regions,
                "epsilon": {g: 0.5 * r + 0.1 * i for i, g in enumerate(REGIONS)},
                "refused": {},
                "failed": {},
                "rejected": {},
            }
        )
    return rows


def _privacy() -> dict:
    return {
        g: {
            "epsilon": 2.0 + 0.1 * i,
            "delta": 1e-5,
            "budget": 10.0,
            "accountant": "rdp",
            "target_epsilon": 2.0,
            "refused": None,
        }
        for i, g in enumerate(REGIONS)
    }


def _make_run(path: Path, data_file: Path) -> Path:
    path.mkdir(parents=True)
    data_file.write_text("customer_id,churn\n1,0\n")
    (path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "task": "churn",
                "regions": {g: str(data_file) for g in REGIONS},
                "seed": 7,
                "model": {"kind": "mlp", "hidden": [8]},
                "training": {"rounds": 4, "local_epochs": 1},
            }
        )
    )
    with open(path / "metrics.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
    (path / "summary.json").write_text(
        json.dumps(
            {
                "name": "r",
                "run_id": "r-1234",
                "task": "churn",
                "privacy_mode": "sample_dp",
                "final_metrics": {"auc": 0.74, "log_loss": 0.5, "accuracy": 0.8, "brier": 0.15, "customers": 900.0},
                "final_metrics_by_region": {
                    g: {"auc": 0.7, "log_loss": 0.5, "customers": 300.0, "positive_rate": 0.25} for g in REGIONS
                },
                "privacy": _privacy(),
                "regions": {
                    g: {
                        "customers_in_table": 1500.0,
                        "excluded_no_consent": 100.0,
                        "forgotten": 2.0,
                        "train": 1100.0,
                        "holdout": 298.0,
                    }
                    for g in REGIONS
                },
                "warnings": [],
                "shards": 1,
                "config_sha256": "abc",
                "code_version": "deadbee",
                "wall_time_s": 12.0,
            }
        )
    )
    return path


def _sweep_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for eps in ["0.5", "1.0", "4.0", "none"]:
        for seed in range(3):
            base = 0.8 if eps == "none" else 0.8 - 0.05 / float(eps)
            rows.append(
                {
                    "cell": f"{eps}_{seed}",
                    "kind": "federated",
                    "seed": seed,
                    "privacy.target_epsilon": eps,
                    "status": "done",
                    "error": "",
                    "auc": base + rng.normal(0, 0.01),
                    "epsilon_max": 0.0 if eps == "none" else float(eps),
                    "run_dir": "/nowhere",
                }
            )
    for seed in range(3):
        rows.append(
            {
                "cell": f"c_{seed}",
                "kind": "centralised",
                "seed": seed,
                "privacy.target_epsilon": None,
                "status": "done",
                "error": "",
                "auc": 0.82,
                "epsilon_max": math.nan,
                "run_dir": "/nowhere",
            }
        )
    rows.append(
        {
            "cell": "bad",
            "kind": "federated",
            "seed": 0,
            "privacy.target_epsilon": "8.0",
            "status": "failed",
            "error": "FederationError: boom",
            "auc": math.nan,
            "epsilon_max": math.nan,
            "run_dir": "/nowhere",
        }
    )
    return pd.DataFrame(rows)


def test_utility_plot_has_labelled_axes_and_one_line_per_series() -> None:
    ax = plot_utility_per_round(_rows()).axes[0]
    assert ax.get_xlabel() == "round" and "AUC" in ax.get_ylabel()
    labels = [ln.get_label() for ln in series_lines(ax)]
    assert labels == ["pooled", "region apac", "region eu", "region us"]
    pooled = series_lines(ax)[0]
    assert list(pooled.get_xdata()) == [1, 2, 3, 4]
    assert np.allclose(pooled.get_ydata(), [0.65, 0.68, 0.71, 0.74])


def test_epsilon_plot_has_one_line_per_region_and_the_budget() -> None:
    ax = plot_epsilon_per_round(_rows(), _privacy()).axes[0]
    assert ax.get_xlabel() == "round" and "ε" in ax.get_ylabel()
    lines = series_lines(ax)
    assert [ln.get_label() for ln in lines] == [f"region {g}" for g in sorted(REGIONS)]
    eu = next(ln for ln in lines if ln.get_label() == "region eu")
    assert np.allclose(eu.get_ydata(), [0.5, 1.0, 1.5, 2.0])
    horizontal = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1]
    assert {float(ln.get_ydata()[0]) for ln in horizontal} == {10.0, 2.0}  # budget and target ε
    assert any("budget" in t.get_text() for t in ax.texts)


def test_privacy_utility_plot_has_error_bars_and_both_baselines() -> None:
    df = _sweep_frame()
    ax = plot_privacy_utility(df, grid=["privacy.target_epsilon"]).axes[0]
    assert "ε" in ax.get_xlabel() and "AUC" in ax.get_ylabel() and ax.get_xscale() == "log"
    labels = [ln.get_label() for ln in series_lines(ax)]
    assert labels == ["federated, sample-level DP", "non-private federated", "non-private centralised (pooled data)"]
    curve = series_lines(ax)[0]
    assert list(curve.get_xdata()) == [0.5, 1.0, 4.0]  # `none` and the failed cell are not points
    assert len(ax.containers) == 1 and ax.containers[0].has_yerr


def test_cost_of_privacy_table_is_against_the_non_private_federated_mean() -> None:
    df = _sweep_frame()
    t = privacy_utility_table(df, grid=["privacy.target_epsilon"])
    d = df[df["status"] == "done"]
    ref = d[d["privacy.target_epsilon"] == "none"]["auc"].mean()
    at_half = d[d["privacy.target_epsilon"] == "0.5"]["auc"]
    row = t[t["ε (target)"] == "0.5"].iloc[0]
    assert row["seeds"] == 3
    assert row["cost of privacy (AUC points)"] == f"{(ref - at_half.mean()) * 100:+.2f}"
    assert row["pooled AUC (mean ± std)"] == f"{at_half.mean():.4f} ± {at_half.std(ddof=1):.4f}"
    assert row["gap to centralised (AUC points)"] == f"{(0.82 - at_half.mean()) * 100:+.2f}"
    assert any("centralised" in str(v) for v in t["ε (target)"])


def test_categorical_parameter_plot_has_one_point_per_value() -> None:
    df = _sweep_frame().assign(
        privacy=lambda d: d["privacy.target_epsilon"].map(lambda e: "none" if e == "none" else "sample_dp")
    )
    ax = plot_by_parameter(df, "privacy").axes[0]
    assert ax.get_xlabel() == "privacy" and "AUC" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sample_dp", "none"]


def test_model_card_states_data_privacy_and_limits(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", tmp_path / "eu.csv")
    card = model_card(RunView.load(run))
    for heading in ("## Intended use", "## Data", "## Privacy guarantee", "## Metrics", "## Known limits"):
        assert heading in card
    assert "| eu | 1500 | 100 | 2 | 1100 | 298 | 0.250 |" in card
    assert "ε = 2.20" in card and "Sample-level" in card  # the worst region, in plain words
    assert "e^ε ≈ 9.0×" in card


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(html_file: Path, tmp_path: Path) -> tuple[str, Path]:
    """Dump the DOM after load (a probe script writes image counts into the title) and take a screenshot."""
    probe = html_file.with_name("probe.html")
    script = (
        "<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
        "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
        "document.title='IMAGES '+ok+'/'+im.length+' TEXT '+document.body.innerText.length;});</script>"
    )
    probe.write_text(html_file.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    common = [
        _chromium() or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1000,1400", probe.resolve().as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom, shot


@pytest.mark.skipif(
    _chromium() is None, reason="headless Chromium is not installed (.ci/run installs it: apt-get install chromium)"
)
def test_run_and_sweep_html_render_in_chromium_with_every_plot_loaded(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    run = _make_run(tmp_path / "run", tmp_path / "eu.csv")
    html_path, md_path = write_report(run)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    df = _sweep_frame()
    df.to_csv(sweep / "results.csv", index=False)
    (sweep / "sweep.json").write_text(
        json.dumps(
            {"spec": {"name": "s", "grid": {"privacy.target_epsilon": []}, "seeds": [0, 1, 2]}, "invocations": []}
        )
    )
    sweep_html, sweep_md = write_report(sweep)
    for page, n_plots in ((html_path, 2), (sweep_html, 1)):
        dom, shot = _render(page, tmp_path)
        title = re.search(r"<title>(.*?)</title>", dom)
        assert title is not None, dom[:500]
        m = re.fullmatch(r"IMAGES (\d+)/(\d+) TEXT (\d+)", title.group(1))
        assert m is not None, title.group(1)
        assert int(m.group(1)) == int(m.group(2)) == n_plots
        assert int(m.group(3)) > 500  # the page has its text, not a blank body
        pixels = mpimg.imread(shot)
        assert pixels.std() > 0.05  # not a blank (single-colour) screenshot
    md = md_path.read_text()
    assert "report_files/utility.png" in md and (run / "report_files" / "utility.png").stat().st_size > 1000
    assert "sha256" in md and "deadbee" in md  # provenance: data hash and code version
    assert (run / "model_card.md").exists()
    assert "cost of privacy" in sweep_md.read_text()


def test_report_on_a_folder_that_is_neither_says_so(tmp_path: Path) -> None:
    from fedcrm.errors import StorageError

    with pytest.raises(StorageError, match="neither a run folder"):
        write_report(tmp_path)


def test_results_table_round_trips_through_parquet(tmp_path: Path) -> None:
    from fedcrm.run_summary import RunSummary
    from fedcrm.sweep import Cell, CellOutcome

    outs = [
        CellOutcome(
            Cell(id="a", kind="federated", seed=0, params={"privacy.target_epsilon": 1.0}, overrides={}),
            None,
            tmp_path / "a",
            "done",
            summary=RunSummary(
                name="a",
                task="churn",
                privacy_mode="sample_dp",
                final_metrics={"auc": 0.7},
                privacy={"eu": {"epsilon": 0.9}},
                regions={},
                warnings=[],
                config_sha256="0" * 64,
                code_version="abc",
                wall_time_s=1.0,
            ),
        ),
        CellOutcome(
            Cell(id="b", kind="federated", seed=0, params={"privacy.target_epsilon": "none"}, overrides={}),
            None,
            tmp_path / "b",
            "failed",
            error="boom",
        ),
    ]
    write_results(outs, tmp_path)
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert list(back["privacy.target_epsilon"]) == ["1.0", "none"]
    assert back.loc[0, "epsilon_eu"] == 0.9 and back.loc[1, "error"] == "boom"


def test_report_command_writes_html_markdown_and_model_card(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app

    run = _make_run(tmp_path / "run", tmp_path / "eu.csv")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").exists() and (run / "report.md").exists() and (run / "model_card.md").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "neither a run folder" in bad.output
