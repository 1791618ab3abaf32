"""What the ledger keys on must be the region's: not the server's run id, not a rounded fraction, not an
event id a backup brings back (issue 23, item 9).

- The evaluation allowance was counted per run id, which the server chooses: a new id was a new allowance.
  It is counted per UTC day now, over every run.
- The hold-out was recorded as ``%g`` of the fraction while the mask compares with ``int(f·1e6)``: two
  fractions that print alike but hold out different customers read as one hold-out, and the customers
  that moved between training and hold-out were charged for one side only. The ledger records the
  mask's integer now.
- Reproducible keys were made of the ledger's id and the event id: a ledger restored from a backup gave its
  next release the id, hence the key and the noise, of a release already sent. Each event has a random
  nonce now.

Each test drives the region as a server does: a plan built by the server's codec, on real files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import one_region

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import Schema
from fedcrm.data.split import hash_buckets
from fedcrm.errors import ConfigError, PolicyError
from fedcrm.fl.codec import plan_config, read_plan
from fedcrm.governance.policy import load_policy
from fedcrm.models import build_model, get_weights
from fedcrm.node_settings import NodeSettings
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import LEDGER_FILENAME, PrivacyLedger
from fedcrm.region import Region
from fedcrm.state.secret import region_secret
from fedcrm.unlearning.shards import holdout_mask

Weights = dict[str, np.ndarray]


def _plan(cfg: ExperimentConfig, *, run_id: str) -> tuple[ExperimentConfig, Schema, str]:
    """The plan of ``run_id`` as the region reads it off the wire."""
    return read_plan(plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id=run_id))


def _weights(cfg: ExperimentConfig, schema: Schema, settings: NodeSettings) -> Weights:
    n = Region(settings).load(cfg, schema).x.shape[1]
    return get_weights(build_model(cfg.model, n_features=n, seed=0))


@pytest.mark.filterwarnings("ignore:the policy's evaluations_per_run")
def test_a_new_run_id_does_not_buy_a_new_evaluation_allowance(tmp_path: Path) -> None:
    """0.1: 2 answers per run id, and 10 run ids gave 20 answers. Now: 2 a day, whatever the run ids."""
    # The field a 0.1 policy names; 0.2 reads it as the daily allowance (and says it is deprecated).
    base, settings = one_region(tmp_path, customers=600, policy={"evaluations_per_run": 2, "privacy_budget": 1000})
    answered = 0
    for k in range(10):
        cfg, schema, run_id = _plan(base, run_id=f"probe-{k}")
        try:
            Region(settings).evaluate(cfg, schema, constituents=[_weights(cfg, schema, settings)], run_id=run_id)
            answered += 1
        except PolicyError as e:
            assert "evaluations_per_run, read as evaluations_per_day" in str(e)
    assert answered == 2
    assert len(PrivacyLedger.open(settings.state_dir, region="eu").events()) == 2


def test_the_old_allowance_field_is_read_per_day_with_a_deprecation(tmp_path: Path) -> None:
    _, settings = one_region(tmp_path, customers=600, policy={"evaluations_per_run": 3})
    with pytest.warns(FutureWarning, match="evaluations_per_run .* deprecated .* evaluations_per_day"):
        region = Region(settings)
    assert region.policy.evaluation_allowance == (3, "evaluations_per_run, read as evaluations_per_day")
    both = tmp_path / "both.yaml"
    both.write_text("evaluations_per_run: 3\nevaluations_per_day: 5\n")
    with pytest.raises(ConfigError, match="keep evaluations_per_day only"):
        load_policy(both)


def test_fractions_that_print_alike_but_hold_out_different_customers_are_charged_together(tmp_path: Path) -> None:
    """0.1999996 and 0.2 both print as 0.2 under %g, but the mask holds out buckets < 199999 and < 200000:
    a customer in bucket 199999 is trained on under the first and answered about under the second. 0.1
    recorded both as ``0.2`` and charged that customer for one side only (ε of training alone); the ledger
    now records the mask's integers, sees two hold-outs, and composes every event for everyone."""
    fractions = (0.1999996, 0.2)
    trained_at = {"privacy.accountant": "rdp", "evaluation.holdout_fraction": fractions[0], "training.rounds": 1}
    base, settings = one_region(
        tmp_path,
        customers=600,
        overrides=trained_at,
        policy={"holdout_fraction": fractions[0], "privacy_budget": 1000},
    )
    cfg, schema, run_id = _plan(base, run_id="before")
    Region(settings).train(cfg, schema, weights=_weights(cfg, schema, settings), shard=0, round_=1, run_id=run_id)
    # The data owner moves the hold-out a millionth; the server asks for an answer about it.
    settings.policy_path.write_text(f"holdout_fraction: {fractions[1]}\nprivacy_budget: 1000\n")  # type: ignore[union-attr]
    cfg, schema, run_id = _plan(
        base.model_copy(update={"evaluation": base.evaluation.model_copy(update={"holdout_fraction": fractions[1]})}),
        run_id="after",
    )
    region = Region(settings)
    region.evaluate(cfg, schema, constituents=[_weights(cfg, schema, settings)], run_id=run_id)

    events = region.ledger.events()
    everything = epsilon([e.release for e in events], delta=region.delta, accountant="rdp")
    assert region.ledger.epsilon(delta=region.delta, accountant="rdp") == pytest.approx(everything)
    assert [e.population for e in events] == ["train:199999/1000000", "holdout:200000/1000000"]
    ids = np.asarray([f"c{i}" for i in range(20_000)], dtype=object)
    secret = region_secret(settings.state_dir)
    for fraction, event in zip(fractions, events, strict=True):  # the recorded integer is the mask's threshold
        threshold = int(event.population.split(":")[1].split("/")[0])  # type: ignore[union-attr]
        buckets = hash_buckets(ids, buckets=1_000_000, key=f"holdout:{secret}")
        assert np.array_equal(holdout_mask(ids, fraction=fraction, secret=secret), buckets < threshold)


def test_old_fraction_labels_still_read_as_the_same_hold_out(tmp_path: Path) -> None:
    """A ledger written before 0.2.0 (``train:0.2``) and a new event at the same fraction are one hold-out
    (a compatibility check that goes with the one above, not an attack)."""
    ledger = PrivacyLedger.open(tmp_path, region="eu")
    common = {"shard": 0, "purpose": "churn", "run_id": "r", "round": 1, "delta": 1e-6}
    ledger.record_release(release=GaussianRelease(1.0, 0.1, 10), population="train:0.2", **common)
    ledger.record_release(
        release=GaussianRelease(3.0, 1.0, 1), population="holdout:200000/1000000", mechanism="gaussian", **common
    )
    train = ledger.epsilon_of_shard(shard=0, shards=1, delta=1e-6, accountant="rdp")
    holdout = ledger.epsilon_of_holdout(delta=1e-6, accountant="rdp")
    assert train < epsilon([e.release for e in ledger.events()], delta=1e-6, accountant="rdp")
    assert ledger.epsilon(delta=1e-6, accountant="rdp") == pytest.approx(max(train, holdout))  # apart, not summed


def test_a_ledger_restored_from_a_backup_never_repeats_a_release_key(tmp_path: Path) -> None:
    """0.1: restore the ledger from a backup, ask for the same round again: the release had the same event
    id, so the same key, so the same noise: the two updates were equal to the bit, and their difference
    (zero) told the server the noise exactly. Now each event draws a random nonce."""
    base, settings = one_region(
        tmp_path,
        customers=600,
        overrides={"privacy.noise": "reproducible", "training.rounds": 1},
        policy={"allow_reproducible_noise": True, "privacy_budget": 1000},
    )
    cfg, schema, run_id = _plan(base, run_id="r")
    start = _weights(cfg, schema, settings)
    ledger_file = settings.state_dir / LEDGER_FILENAME
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in settings.state_dir.glob(LEDGER_FILENAME + "*"):  # the file and its write-ahead log
        shutil.copy2(path, backup / path.name)

    first = Region(settings).train(cfg, schema, weights=start, shard=0, round_=1, run_id=run_id)
    (sent,) = PrivacyLedger.open(settings.state_dir, region="eu").events()
    for path in settings.state_dir.glob(LEDGER_FILENAME + "*"):  # the data owner restores the backup
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, settings.state_dir / path.name)
    assert ledger_file.exists()
    again = Region(settings).train(cfg, schema, weights=start, shard=0, round_=1, run_id=run_id)

    distance = sum(float(np.sum((first.weights[k] - again.weights[k]) ** 2)) for k in first.weights)
    assert distance > 0  # fresh noise: no difference of two releases is noiseless
    ledger = PrivacyLedger.open(settings.state_dir, region="eu")
    (resent,) = ledger.events()
    assert resent.id == sent.id  # the backup's history: the same id again
    assert resent.nonce is not None and resent.nonce != sent.nonce  # yet a nonce of its own
    assert ledger.nonce(resent.id).endswith(resent.nonce)
