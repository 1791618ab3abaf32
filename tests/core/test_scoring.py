"""``fedcrm score`` on a real (tiny) federated run: who is scored, with what, what the audit log keeps,
and that an erasure served by a retrain changes the next scoring (customer gone, new model version).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_tiny_config
from typer.testing import CliRunner

from fedcrm.cli import app
from fedcrm.commands.unlearning import forget_customers, retrain_run
from fedcrm.config import load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import load_table
from fedcrm.data.schema import load_schema
from fedcrm.evaluation.explain import explain_customer
from fedcrm.evaluation.served import ServedModel
from fedcrm.fl.simulation import run_simulated
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.scoring import ScoringModel, score_region
from fedcrm.unlearning.retrain import run_view

SCHEMA = load_schema(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("scored")
    cfg = load_config(write_tiny_config(base, regions={"eu": 600, "us": 500}, overrides={"unlearning.shards": 2}))
    run_simulated(cfg, run_dir=base / "run", state_root=base / "state", report=lambda s: None)
    return base


@pytest.fixture
def fresh(trained: Path, tmp_path: Path) -> dict[str, Path]:
    """A copy of the trained run and state (config.yaml's absolute data paths still hold)."""
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "state", tmp_path / "state")
    return {"run": tmp_path / "run", "state": tmp_path / "state", "data": trained / "data" / "eu.csv", "tmp": tmp_path}


def _score(f: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    result = runner.invoke(
        app,
        [
            "score",
            "--region",
            "eu",
            "--model",
            str(f["run"]),
            "--state",
            str(f["state"]),
            "--out",
            str(out),
            "--json",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_score_writes_the_served_score_of_every_consenting_customer_and_nothing_else(fresh: dict[str, Path]) -> None:
    out = fresh["tmp"] / "scores.csv"
    report = _score(fresh, out, "--reasons", "3", "--chunk-rows", "1000")
    table = load_table(fresh["data"], SCHEMA)
    consenting = table.consent["churn"].to_numpy(dtype=bool)
    assert 0 < consenting.sum() < len(table)  # the test data really has customers who said no
    scores = pd.read_csv(out, dtype={"customer_id": str})
    assert list(scores.columns) == ["customer_id", "score", "model_version", "reason_1", "reason_2", "reason_3"]
    assert list(scores["customer_id"]) == list(table.ids[consenting])
    served = ServedModel.load(fresh["run"])
    expected = served.proba(FeatureEncoder(SCHEMA).encode(table.subset(consenting)))
    np.testing.assert_allclose(scores["score"], expected, atol=1e-12)
    assert set(scores["model_version"]) == {1}
    assert report["counts"] == {
        "customers_in_table": 600,
        "forgotten": 0,
        "excluded_no_consent": int((~consenting).sum()),
        "scored": int(consenting.sum()),
    }
    # Reasons are explain's own sentences for that customer, largest first.
    one = table.subset(table.ids == scores["customer_id"][0])
    e = explain_customer(
        served.models,
        schema=SCHEMA,
        x=FeatureEncoder(SCHEMA).encode(one)[0],
        values={c: one.values[c].iloc[0] for c in one.values.columns},
        customer_id=one.ids[0],
    )
    assert [scores[f"reason_{k}"][0] for k in (1, 2, 3)] == [c.sentence("churn") for c in e.top(3)]
    # The region's audit log records the scoring: counts and version, and no customer id.
    log = (fresh["state"] / "eu" / "audit.log").read_text()
    last = json.loads(log.strip().split("\n")[-1])
    assert last["action"] == "model_scored" and last["details"]["model_version"] == 1
    assert last["details"]["scored"] == int(consenting.sum())
    assert not any(cid in log for cid in table.ids)


def test_parquet_output_holds_the_same_scores_as_csv(fresh: dict[str, Path]) -> None:
    _score(fresh, fresh["tmp"] / "s.csv")
    _score(fresh, fresh["tmp"] / "s.parquet")
    a = pd.read_csv(fresh["tmp"] / "s.csv", dtype={"customer_id": str})
    b = pd.read_parquet(fresh["tmp"] / "s.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)


def test_a_withdrawn_customer_gets_no_score_though_the_table_still_says_yes(fresh: dict[str, Path]) -> None:
    table = load_table(fresh["data"], SCHEMA)
    who = str(table.ids[table.consent["churn"].to_numpy(dtype=bool)][0])
    ConsentWithdrawals(fresh["state"] / "eu").add(who, purpose="churn")
    report = _score(fresh, fresh["tmp"] / "s.csv")
    scored = pd.read_csv(fresh["tmp"] / "s.csv", dtype={"customer_id": str})["customer_id"]
    assert who not in set(scored)
    assert report["counts"]["excluded_no_consent"] == int((~table.consent["churn"].to_numpy(dtype=bool)).sum()) + 1


def _served_scores(f: dict[str, Path], ids: pd.Series) -> np.ndarray:
    """What the model served now gives the customers ``ids``, computed here from its own weights."""
    table = load_table(f["data"], SCHEMA)
    rows = table.subset(np.isin(table.ids, ids.to_numpy()))
    return ServedModel.load(f["run"]).proba(FeatureEncoder(SCHEMA).encode(rows))


def test_after_an_erasure_the_next_score_leaves_the_customer_out_and_uses_the_new_model(fresh: dict[str, Path]) -> None:
    _score(fresh, fresh["tmp"] / "before.csv")
    before = pd.read_csv(fresh["tmp"] / "before.csv", dtype={"customer_id": str})
    trained_on = run_view(fresh["run"], region="eu", state_root=fresh["state"]).trained
    victim = next(c for c in before["customer_id"] if c in trained_on)  # held-out customers stale nothing
    # The erasure is served at once by exclusion (version 2: the constituent that trained on the victim is
    # no longer used), then by a retrain of that constituent without them (version 3).
    forget_customers(region="eu", customer_ids=[victim], state_root=fresh["state"], runs=[fresh["run"]])
    excluded_report = _score(fresh, fresh["tmp"] / "excluded.csv")
    excluded = pd.read_csv(fresh["tmp"] / "excluded.csv", dtype={"customer_id": str})
    served = ServedModel.load(fresh["run"])
    assert len(served.models) == 1  # of the two constituents, the one that never saw the victim
    np.testing.assert_allclose(excluded["score"], _served_scores(fresh, excluded["customer_id"]), atol=1e-12)
    retrain_run(fresh["run"], state_root=fresh["state"], report=lambda s: None)
    report = _score(fresh, fresh["tmp"] / "after.csv")
    after = pd.read_csv(fresh["tmp"] / "after.csv", dtype={"customer_id": str})
    for scored, r in ((excluded, excluded_report), (after, report)):
        assert victim not in set(scored["customer_id"])
        assert len(scored) == len(before) - 1 and r["counts"]["forgotten"] == 1
    assert set(before["model_version"]) == {1} and set(excluded["model_version"]) == {2}
    assert set(after["model_version"]) == {3}
    assert excluded_report["model_version"] == 2 and report["model_version"] == 3
    # Each version scores differently (one constituent dropped, then retrained with fresh noise), and the
    # scores are the served model's own (both constituents again).
    assert len(ServedModel.load(fresh["run"]).models) == 2
    kept = before[before["customer_id"] != victim].reset_index(drop=True)
    assert not np.allclose(kept["score"], excluded["score"]) and not np.allclose(excluded["score"], after["score"])
    np.testing.assert_allclose(after["score"], _served_scores(fresh, after["customer_id"]), atol=1e-12)


def test_a_bad_table_writes_nothing_and_names_file_line_and_column(fresh: dict[str, Path]) -> None:
    bad = fresh["tmp"] / "bad.csv"
    lines = fresh["data"].read_text().split("\n")
    header = lines[0].split(",")
    row = lines[400].split(",")
    row[header.index("tenure_months")] = "abc"
    lines[400] = ",".join(row)
    lines.insert(100, "")  # a blank line: the bad row is now line 402, though only row 400 of the table
    bad.write_text("\n".join(lines))
    out = fresh["tmp"] / "s.csv"
    result = runner.invoke(
        app,
        [
            "score",
            "--region",
            "eu",
            "--model",
            str(fresh["run"]),
            "--state",
            str(fresh["state"]),
            "--data",
            str(bad),
            "--out",
            str(out),
            "--chunk-rows",
            "1000",
        ],
    )
    assert result.exit_code == 2
    assert f"{bad}:402: column `tenure_months`: expected a number, found 'abc'" in result.output
    assert not out.exists() and not list(fresh["tmp"].glob("s.csv*"))


def test_an_output_that_is_neither_csv_nor_parquet_is_refused(fresh: dict[str, Path]) -> None:
    result = runner.invoke(
        app,
        [
            "score",
            "--region",
            "eu",
            "--model",
            str(fresh["run"]),
            "--state",
            str(fresh["state"]),
            "--out",
            str(fresh["tmp"] / "s.xlsx"),
        ],
    )
    assert result.exit_code == 2 and ".csv or .parquet" in result.output


def test_a_first_chunk_with_nobody_to_score_does_not_break_the_output(fresh: dict[str, Path]) -> None:
    """A chunk where everyone refused consent writes no rows, and the chunks after it still go out."""
    table = pd.read_csv(fresh["data"], dtype=str, keep_default_na=False)
    table.loc[:49, "consent_churn"] = "no"
    data = fresh["tmp"] / "refusers_first.csv"
    table.to_csv(data, index=False)
    model = ScoringModel.load(fresh["run"])
    for out in (fresh["tmp"] / "s.csv", fresh["tmp"] / "s.parquet"):
        # The library call: the CLI's --chunk-rows starts at 1000, more than this table holds.
        result = score_region(
            region="eu", model=model, data=data, state_dir=fresh["state"] / "eu", out=out, chunk_rows=50
        )
        scores = pd.read_csv(out, dtype={"customer_id": str}) if out.suffix == ".csv" else pd.read_parquet(out)
        usable = table[table["consent_churn"] == "yes"]
        assert result.counts["scored"] == len(scores) == len(usable) > 0
        assert set(scores["customer_id"]) == set(usable["customer_id"])
