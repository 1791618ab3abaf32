"""Erasure end to end in real Flower simulations: exactness against a from-scratch run, no trace of the
ids, the ledger charged for the retrain on the stale shard only, crash and resume, budget refusal.

One tiny federation (2 regions x 600 synthetic customers, 2 shards, 2 rounds, DP) is trained once for
the module; the tests work on copies of its run and state folders. It draws its noise in reproducible
mode (the regions' policies allow it): every release still has its own key, derived from the region's
secret and the release's recorded nonce, so the retrain can be replayed from a copy of the regions' state
given those nonces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_tiny_config

from fedcrm.commands.unlearning import forget_customers, retrain_run
from fedcrm.config import load_config
from fedcrm.errors import PrivacyBudgetError, UnlearningError
from fedcrm.fl.simulation import run_simulated
from fedcrm.governance.request_store import RequestStore
from fedcrm.privacy.accountant import GaussianRelease
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, PrivacyLedger
from fedcrm.privacy.randomness import ReleaseRandomness
from fedcrm.runs import load_weights
from fedcrm.unlearning import retrain as retrain_mod
from fedcrm.unlearning.marker import RUN_MARKER
from fedcrm.unlearning.retrain import plan_retrain, retrain, retrain_releases, run_view
from fedcrm.unlearning.shards import region_secret

SHARDS = 2
STALE = 1  # the forgotten customers are all in this shard
REGIONS = ("eu", "us")
PERMISSIVE = Path(__file__).resolve().parents[2] / "configs" / "policies" / "permissive.yaml"


def _copy(src: Path, dst: Path) -> tuple[Path, Path]:
    """A copy of the trained run and its state: config.yaml's absolute data paths still hold."""
    shutil.copytree(src / "run", dst / "run")
    shutil.copytree(src / "state", dst / "state")
    return dst / "run", dst / "state"


def _eps(state: Path, region: str, delta: float) -> dict[int, float]:
    return PrivacyLedger.open(state / region, region=region).epsilon_by_shard(
        shards=SHARDS, delta=delta, accountant="rdp"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    cfg = load_config(
        write_tiny_config(
            base,
            regions={"eu": 600, "us": 600},
            overrides={
                "unlearning.shards": SHARDS,
                "privacy.noise": "reproducible",
                "policies": {r: str(PERMISSIVE) for r in REGIONS},
            },
        )
    )
    run_simulated(cfg, run_dir=base / "run", state_root=base / "state", report=lambda s: None)
    return base


@pytest.fixture(scope="module")
def erased(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Forget 3 customers of eu (shard 1), crash the retrain twice, finish it; keep what each step showed."""
    base = tmp_path_factory.mktemp("erased")
    run, state = _copy(trained, base)
    view = run_view(run, region="eu", state_root=state)
    victims = [cid for cid, k in view.trained.items() if k == STALE][:3]
    delta = json.loads((run / "summary.json").read_text())["privacy"]["eu"]["delta"]
    seen: dict[str, Any] = {
        "run": run,
        "state": state,
        "victims": victims,
        "delta": delta,
        "log": [],
        "old": {k: load_weights(run / "model" / f"constituent-{k}.npz") for k in range(SHARDS)},
        "old_bytes": {p.relative_to(run): p.read_bytes() for p in run.rglob("*.npz")},
        "eps_before": {r: _eps(state, r, delta) for r in REGIONS},
    }
    requests = forget_customers(region="eu", customer_ids=victims, state_root=state, runs=[run])
    seen["requests"] = [r.request_id for r in requests]
    seen["excluded"] = {
        "version": json.loads((run / "model" / "model.json").read_text()),
        "files": sorted(str(p.relative_to(run)) for p in run.rglob(f"*shard-{STALE}.npz"))
        + sorted(str(p.relative_to(run)) for p in run.glob(f"model/constituent-{STALE}.npz")),
    }

    # Crash 1: the federated run dies half-way (a partial checkpoint in the staging folder).
    def dying(cfg: Any, *, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / f"round-0001-shard-{STALE}.npz").write_bytes(b"partial")
        raise RuntimeError("node lost")

    with pytest.raises(UnlearningError, match="old model \\(version 2\\) is still served") as e1:
        retrain(run, state_root=state, simulate=dying, report=seen["log"].append)
    seen["crash1"] = {
        "error": str(e1.value),
        "bytes_unchanged": all((run / p).read_bytes() == b for p, b in seen["old_bytes"].items() if (run / p).exists()),
        "version": json.loads((run / "model" / "model.json").read_text())["version"],
        "status": {r.status for r in RequestStore(state / "eu", region="eu").all()},
        "marker": (run / RUN_MARKER).exists(),
    }

    # Crash 2: the retrain finished, the commit died before the receipts were written.
    def no_receipts(plan: Any) -> Any:
        raise OSError("disk full")

    # The regions' state just before the retrain's releases (secret, ledger, tombstones): what a region
    # needs to replay them (test_forget_and_retrain_equals_training_from_scratch_without_the_customers).
    for region in REGIONS:
        shutil.copytree(state / region, base / "state-before-retrain" / region)
    seen["state_before_retrain"] = base / "state-before-retrain"
    mp = pytest.MonkeyPatch()
    mp.setattr(retrain_mod, "_serve_requests", no_receipts)
    with pytest.raises(OSError, match="disk full"):
        retrain_run(run, state_root=state, report=seen["log"].append)
    mp.undo()
    seen["crash2"] = {
        "status": {r.status for r in RequestStore(state / "eu", region="eu").all()},
        "marker": (run / RUN_MARKER).exists(),
    }

    # Resume: completes from the finished retrain, without training again.
    def must_not_train(*a: Any, **k: Any) -> dict[str, Any]:
        raise AssertionError("the finished retrain should be committed, not run again")

    seen["result"] = retrain(run, state_root=state, simulate=must_not_train, report=seen["log"].append)
    seen["eps_after"] = {r: _eps(state, r, delta) for r in REGIONS}
    return seen


def test_forget_serves_by_exclusion_and_a_crashed_retrain_leaves_that_model_served(erased: dict[str, Any]) -> None:
    excluded = erased["excluded"]
    assert excluded["version"]["version"] == 2 and STALE not in excluded["version"]["shards"]
    assert excluded["files"] == []  # the stale constituent and its checkpoints were destroyed at once
    c1 = erased["crash1"]
    assert c1["bytes_unchanged"] and c1["version"] == 2
    assert c1["status"] == {"excluded"} and c1["marker"]
    assert "fedcrm retrain" in c1["error"]
    assert erased["crash2"]["status"] == {"excluded"} and erased["crash2"]["marker"]
    result = erased["result"]
    assert result.resumed and result.stale == [STALE] and result.model_version == 3
    assert json.loads((erased["run"] / "model" / "model.json").read_text())["shards"] == list(range(SHARDS))
    assert {r.status for r in RequestStore(erased["state"] / "eu", region="eu").all()} == {"served"}
    assert not (erased["run"] / RUN_MARKER).exists()
    assert not list(erased["run"].glob(".retrain-*")), "the staging folder was not removed"


def test_only_the_stale_constituent_changes_and_its_old_weights_are_gone(erased: dict[str, Any]) -> None:
    run = erased["run"]
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["version"] == 3 and meta["shards"] == list(range(SHARDS))
    new = {k: load_weights(run / "model" / f"constituent-{k}.npz") for k in range(SHARDS)}
    old = erased["old"]
    assert all(np.array_equal(new[0][n], old[0][n]) for n in old[0])
    assert not all(np.array_equal(new[STALE][n], old[STALE][n]) for n in old[STALE])
    old_bytes = erased["old_bytes"]
    for p, b in old_bytes.items():
        if f"shard-{STALE}" in p.name or p.name == f"constituent-{STALE}.npz":
            assert not (run / p).exists() or (run / p).read_bytes() != b, f"{p} still holds the pre-erasure weights"
        else:
            assert (run / p).read_bytes() == b, f"{p} of an untouched shard changed"
    stale_old = {b for p, b in old_bytes.items() if f"shard-{STALE}" in p.name or p.name.endswith(f"-{STALE}.npz")}
    assert not any(p.read_bytes() in stale_old for p in run.rglob("*") if p.is_file())


def test_the_retrain_is_charged_to_the_stale_shard_only(erased: dict[str, Any]) -> None:
    before, after = erased["eps_before"], erased["eps_after"]
    for region in REGIONS:  # both regions retrained shard 1 without the customers
        assert after[region][STALE] > before[region][STALE] * 1.1
        assert after[region][0] == before[region][0]
    receipts = erased["result"].receipts
    assert len(receipts) == 3
    for receipt in receipts:
        [r] = receipt["runs"]
        assert r["status"] == "served" and r["shard"] == STALE and receipt["region"] == "eu"
        assert (r["model_version_before"], r["excluded_at_version"], r["model_version_after"]) == (1, 2, 3)
        assert r["privacy"]["epsilon_before"] == pytest.approx(before["eu"][STALE])
        assert r["privacy"]["epsilon_after"] == pytest.approx(after["eu"][STALE])
        assert receipt["requested_at"] <= r["served_at"]
    history = [json.loads(x) for x in (erased["run"] / "erasures.jsonl").read_text().splitlines()]
    # One line per request and version: served by exclusion (v2), then by retrain (v3), once each despite the crash.
    assert sorted(h["request_id"] for h in history) == sorted(erased["requests"] * 2)
    assert sorted(p.stem for p in (erased["run"] / "receipts").glob("*.json")) == sorted(erased["requests"])


def test_each_receipt_anchors_the_regions_audit_log_at_its_erasure(erased: dict[str, Any]) -> None:
    """The receipt's head is an entry of eu's audit log at or after that request's `erasure_served`."""
    from fedcrm.governance.audit_log import AuditLog, verify

    log = erased["state"] / "eu" / "audit.log"
    entries = AuditLog(log).entries()
    for r in erased["result"].receipts:
        report = verify(log, expect_head=r["region_audit_head"])
        assert report.ok, report.problem
        served = [e.seq for e in entries if e.action == "erasure_served" and e.details["request_id"] == r["request_id"]]
        assert served and report.anchored_seq is not None and report.anchored_seq >= served[0]


def test_forgotten_ids_appear_nowhere_in_the_run_receipts_state_or_logs(erased: dict[str, Any]) -> None:
    files = [p for p in erased["run"].rglob("*") if p.is_file()]
    files += [p for p in erased["state"].rglob("*") if p.is_file()]
    assert any(p.name == "erasures.jsonl" for p in files) and any("audit" in p.name for p in files)
    for victim in erased["victims"]:
        needle = victim.encode()
        assert not [p for p in files if needle in p.read_bytes()], f"{victim} found on disk"
        assert not any(victim in line for line in erased["log"])
        assert victim not in json.dumps([r for r in erased["result"].receipts])


def test_forget_and_retrain_equals_training_from_scratch_without_the_customers(
    erased: dict[str, Any], tmp_path: Path
) -> None:
    """Bit for bit, in reproducible mode: the stale constituent trained from scratch on the tables without
    the customers, from the regions' state as it was just before the retrain (same secrets, same ledgers)
    with the retrain's recorded release keys, equals the retrained one. And the retrain's keys were fresh:
    none of its releases reused a nonce of the original training, so old and new constituent never shared
    noise."""
    cfg = load_config(erased["run"] / "config.yaml")
    assert cfg.privacy.noise == "reproducible"
    victims = set(erased["victims"])
    regions = {}
    for region, path in cfg.regions.items():
        lines = Path(path).read_text().splitlines(keepends=True)
        kept = [ln for i, ln in enumerate(lines) if i == 0 or ln.split(",", 1)[0] not in victims]
        assert len(lines) - len(kept) == (len(victims) if region == "eu" else 0)
        regions[region] = tmp_path / f"{region}.csv"
        regions[region].write_text("".join(kept))
    shutil.copytree(erased["state_before_retrain"], tmp_path / "state")
    for region in REGIONS:  # the same keys: the retrain's recorded nonces, named by the data owner
        ref_ledger = PrivacyLedger.open(tmp_path / "state" / region, region=region)
        ref_ledger.replay(PrivacyLedger.open(erased["state"] / region, region=region))
    ref_cfg = cfg.model_copy(update={"regions": regions})
    kept_constituents = {k: w for k, w in erased["old"].items() if k != STALE}
    run_simulated(
        ref_cfg,
        run_dir=tmp_path / "ref",
        state_root=tmp_path / "state",
        report=lambda s: None,
        shards=[STALE],
        initial=kept_constituents,
    )
    for k in range(SHARDS):
        got = load_weights(erased["run"] / "model" / f"constituent-{k}.npz")
        want = load_weights(tmp_path / "ref" / "model" / f"constituent-{k}.npz")
        assert got.keys() == want.keys()
        for name in got:
            assert np.array_equal(got[name], want[name]), f"constituent {k} {name} differs from the from-scratch run"

    for region in REGIONS:
        before = PrivacyLedger.open(erased["state_before_retrain"] / region, region=region)
        original = [e for e in before.events(STALE) if e.mechanism == MECHANISM_DP_SGD]
        after = PrivacyLedger.open(erased["state"] / region, region=region)
        known = {e.id for e in before.events()}
        retrained = [e for e in after.events(STALE) if e.mechanism == MECHANISM_DP_SGD and e.id not in known]
        assert len(original) == len(retrained) == cfg.training.rounds
        assert {e.noise for e in original + retrained} == {"reproducible"}
        old_nonces = {after.nonce(e.id) for e in original}
        new_nonces = {after.nonce(e.id) for e in retrained}
        assert not old_nonces & new_nonces, f"{region}: the retrain reused a release key of the original training"
        # Fresh nonces are fresh noise: the first draws of each release's key all differ.
        secret = region_secret(erased["state"] / region)
        draws = [
            ReleaseRandomness.reproducible(region_secret=secret, nonce=n).normal((8,), std=1.0, dtype=torch.float64)
            for n in sorted(old_nonces | new_nonces)
        ]
        assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    old, new = erased["old"][STALE], load_weights(erased["run"] / "model" / f"constituent-{STALE}.npz")
    assert not all(np.array_equal(old[n], new[n]) for n in old)


def test_a_retrain_over_budget_is_refused_and_changes_nothing(trained: Path, tmp_path: Path) -> None:
    run, state = _copy(trained, tmp_path)
    delta = json.loads((run / "summary.json").read_text())["privacy"]["us"]["delta"]
    ledger = PrivacyLedger.open(state / "us", region="us")
    victim = next(cid for cid, k in run_view(run, region="us", state_root=state).trained.items() if k == STALE)
    forget_customers(region="us", customer_ids=[victim], state_root=state, runs=[run])
    _, planned = retrain_releases(plan_retrain(run, state_root=state))["us"]
    retrain_release = planned[STALE]

    def spent_with(*releases: GaussianRelease) -> float:
        return ledger.epsilon_of_shard(
            shard=STALE, shards=SHARDS, delta=delta, accountant="rdp", next_release=list(releases)
        )

    # Another use of the us data has spent nearly all of shard 1's budget (the policy's, 10): the least
    # spending that leaves no room for the retrain. Shard sizes follow the secret-keyed hold-out, so the
    # retrain's cost differs from run to run; the other use is chosen against it.
    other = next(
        GaussianRelease(float(s), 0.2, 60)
        for s in np.linspace(3.0, 1.0, 401)
        if spent_with(GaussianRelease(float(s), 0.2, 60), retrain_release) > 10.001
    )
    ledger.record_release(
        shard=STALE,
        shards=SHARDS,
        purpose="churn",
        run_id="other",
        round=1,
        release=other,
        delta=delta,
        population="train:0.2",
    )
    spent = ledger.epsilon_by_shard(shards=SHARDS, delta=delta, accountant="rdp")
    assert 9 < spent[STALE] < 10 and spent[0] < 9  # shard 0 keeps room: only shard 1's retrain is refused
    events_before = len(ledger.events())

    def must_not_train(*a: Any, **k: Any) -> dict[str, Any]:
        raise AssertionError("a refused retrain must not start")

    with pytest.raises(PrivacyBudgetError, match="region us refuses the erasure retrain of shard 1") as e:
        retrain(run, state_root=state, simulate=must_not_train, report=lambda s: None)
    assert "stays served" in str(e.value) and "pending" in str(e.value)
    assert len(ledger.events()) == events_before
    assert json.loads((run / "model" / "model.json").read_text())["version"] == 2  # served by exclusion
    assert [r.status for r in RequestStore(state / "us", region="us").all()] == ["excluded"]
    assert (run / RUN_MARKER).exists()
