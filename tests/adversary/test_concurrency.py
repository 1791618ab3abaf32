"""The server races the budget: many requests at once, with room for one release (issue 23, item 3).

A region serves messages concurrently (threads of one SuperNode, or several processes on one state
folder). On 0.1 the budget check and the ledger write were two steps: every request that arrived before
the first write passed the check on the same history. With room for one answer, 8 concurrent evaluations
released 7; 8 training requests each planned to spend 2.9 of a budget of 3 released 3. Now the check,
the pending insert and the allowance count are one ledger transaction: exactly one is released.

Each test drives the region as a server does: a plan built by the server's codec, each request with its
own :class:`Region` (its own ledger connection) on the same real SQLite file, started together at a
barrier so they really race.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import one_region

from fedcrm.config import ExperimentConfig
from fedcrm.data.schema import Schema
from fedcrm.errors import PolicyError, PrivacyBudgetError
from fedcrm.fl.codec import plan_config, read_plan
from fedcrm.models import build_model, get_weights
from fedcrm.node_settings import NodeSettings
from fedcrm.privacy.accountant import GaussianRelease, epsilon
from fedcrm.privacy.ledger import MECHANISM_DP_SGD, MECHANISM_GAUSSIAN, PrivacyLedger
from fedcrm.region import Region

REQUESTS = 8
# The populations at the policy's default hold-out, labelled as before 0.2.0 (read as the same hold-out since).
TRAINING, HOLDOUT = "train:0.2", "holdout:0.2"
Weights = dict[str, np.ndarray]
Request = Callable[[Region], object]


def _plan(tmp_path: Path, *, overrides: dict, policy: dict) -> tuple[ExperimentConfig, Schema, str, NodeSettings]:
    """The region ``eu`` and the plan a server would send it, as the region reads it off the wire."""
    cfg, settings = one_region(tmp_path, customers=600, overrides=overrides, policy=policy)
    plan = plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id="race")
    cfg, schema, run_id = read_plan(plan)
    return cfg, schema, run_id, settings


def _history(settings: NodeSettings, *, population: str, mechanism: str, releases: int = 200) -> None:
    """A year of releases on the *other* population (they do not change the ε the race is about): a long
    history makes each budget check take as long as it does at a region that has served for a while."""
    ledger = PrivacyLedger.open(settings.state_dir, region="eu")
    with ledger.session():
        for k in range(releases):
            ledger.record_release(
                shard=0,
                purpose="churn",
                run_id=f"past-{k}",
                round=1,
                release=GaussianRelease(50.0, 1.0, 1),
                delta=1e-6,
                population=population,
                mechanism=mechanism,
            )


def _weights(cfg: ExperimentConfig, schema: Schema, settings: NodeSettings) -> Weights:
    # Also loads the table into the process's cache: the requests race at the ledger, not at the CSV.
    n = Region(settings).load(cfg, schema).x.shape[1]
    return get_weights(build_model(cfg.model, n_features=n, seed=0))


def _outcome(settings: NodeSettings, request: Request, barrier: threading.Barrier) -> str:
    region = Region(settings)  # its own ledger connection, as each message gets in the ClientApp
    barrier.wait()
    try:
        request(region)
    except PrivacyBudgetError:
        return "refused: budget"
    except PolicyError:
        return "refused: allowance"
    return "released"


def _in_threads(settings: NodeSettings, request: Request) -> list[str]:
    barrier = threading.Barrier(REQUESTS)
    outcomes: list[str] = []

    def one() -> None:
        outcomes.append(_outcome(settings, request, barrier))

    threads = [threading.Thread(target=one) for _ in range(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


def _child(
    settings: NodeSettings, request: Request, barrier: threading.Barrier, results: multiprocessing.Queue
) -> None:
    try:
        results.put(_outcome(settings, request, barrier))
    except BaseException as e:  # noqa: BLE001 - the parent reports what went wrong in the child
        results.put(f"failed: {type(e).__name__}: {e}")


def _in_processes(settings: NodeSettings, request: Request) -> list[str]:
    # Forked: each process inherits the loaded modules and the cached table, then opens its own ledger
    # connection. Torch runs on one thread here (the one_thread fixture), so a fork is safe.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(REQUESTS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(settings, request, barrier, results)) for _ in range(REQUESTS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return outcomes


RACES = {"threads": _in_threads, "processes": _in_processes}


@pytest.mark.parametrize("race", sorted(RACES))
def test_concurrent_evaluations_with_room_for_one_answer_release_one(
    tmp_path: Path, race: str, one_thread: None
) -> None:
    """8 evaluation requests at once, budget for one answer: 0.1 released 7 (ε 5.22 against a budget of 3)."""
    one = epsilon([GaussianRelease(3.0, 1.0, 1)], delta=1e-6, accountant="rdp")
    two = epsilon([GaussianRelease(3.0, 1.0, 1)] * 2, delta=1e-6, accountant="rdp")
    budget = (one + two) / 2
    cfg, schema, run_id, settings = _plan(
        tmp_path,
        overrides={"privacy.accountant": "rdp"},
        policy={"privacy_budget": budget, "evaluation_noise": 3.0},  # the default allowance is 24 a day
    )
    _history(settings, population=TRAINING, mechanism=MECHANISM_DP_SGD)
    weights = _weights(cfg, schema, settings)

    def evaluate(region: Region) -> object:
        return region.evaluate(cfg, schema, constituents=[weights], run_id=run_id)

    outcomes = RACES[race](settings, evaluate)
    assert sorted(outcomes) == ["refused: budget"] * (REQUESTS - 1) + ["released"], outcomes
    ledger = PrivacyLedger.open(settings.state_dir, region="eu")
    assert sum(1 for e in ledger.events() if e.run_id == run_id) == 1
    assert ledger.epsilon_of_holdout(delta=1e-6, accountant="rdp") <= budget


@pytest.mark.filterwarnings("ignore:the policy's evaluations_per_run")
@pytest.mark.parametrize("race", sorted(RACES))
def test_concurrent_evaluations_past_the_allowance_release_only_the_allowance(
    tmp_path: Path, race: str, one_thread: None
) -> None:
    """The allowance is counted in the same transaction: 8 requests with one answer left get one (0.1: 8).

    The policy names the allowance as 0.1's policies do (``evaluations_per_run``, now read per day)."""
    cfg, schema, run_id, settings = _plan(
        tmp_path, overrides={}, policy={"privacy_budget": 1000.0, "evaluations_per_run": 1}
    )
    weights = _weights(cfg, schema, settings)

    def evaluate(region: Region) -> object:
        return region.evaluate(cfg, schema, constituents=[weights], run_id=run_id)

    outcomes = RACES[race](settings, evaluate)
    assert sorted(outcomes) == ["refused: allowance"] * (REQUESTS - 1) + ["released"], outcomes
    assert len(PrivacyLedger.open(settings.state_dir, region="eu").events()) == 1


@pytest.mark.parametrize("race", sorted(RACES))
def test_concurrent_training_rounds_each_near_the_budget_release_one(
    tmp_path: Path, race: str, one_thread: None
) -> None:
    """8 training requests, each planned to spend 2.9 of a budget of 3: 0.1 released 3 (ledger ε 3.76)."""
    cfg, schema, run_id, settings = _plan(
        tmp_path,
        overrides={
            "training.rounds": 1,
            "training.batch_size": 128,
            "privacy.target_epsilon": 2.9,
            "privacy.accountant": "rdp",
        },
        policy={"privacy_budget": 3.0},
    )
    _history(settings, population=HOLDOUT, mechanism=MECHANISM_GAUSSIAN)
    weights = _weights(cfg, schema, settings)
    # σ planned once here (the process keeps it): the requests race at the ledger, not in the planner.
    region = Region(settings)
    x, _ = region.load(cfg, schema).train_shard(0)
    region.planned_release(cfg, n=region.policy.declared_size(len(x)))

    def train(region: Region) -> object:
        return region.train(cfg, schema, weights=weights, shard=0, round_=1, run_id=run_id)

    outcomes = RACES[race](settings, train)
    assert sorted(outcomes) == ["refused: budget"] * (REQUESTS - 1) + ["released"], outcomes
    ledger = PrivacyLedger.open(settings.state_dir, region="eu")
    assert sum(1 for e in ledger.events() if e.run_id == run_id) == 1
    assert 2.5 < ledger.epsilon_of_shard(shard=0, shards=1, delta=Region(settings).delta, accountant="rdp") <= 3.0


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_concurrent_training_messages_to_the_client_app_release_one(tmp_path: Path) -> None:
    """The same race through the ClientApp's train handler (each message its own Region and ledger
    session, as a SuperNode serves them): one reply carries an update, seven the budget's refusal code."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from fedcrm import wire
    from fedcrm.fl import client
    from fedcrm.fl.codec import extend, to_record

    overrides = {"training.rounds": 1, "training.batch_size": 128, "privacy.target_epsilon": 2.9}
    cfg, settings = one_region(tmp_path, customers=600, overrides=overrides, policy={"privacy_budget": 3.0})
    _history(settings, population=HOLDOUT, mechanism=MECHANISM_GAUSSIAN)
    plan = plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id="race")
    wire_cfg, schema, _ = read_plan(plan)
    region = Region(settings)
    x, _ = region.load(wire_cfg, schema).train_shard(0)
    region.planned_release(wire_cfg, n=region.policy.declared_size(len(x)))
    weights = _weights(wire_cfg, schema, settings)
    node_config = settings.node_config()  # what the data owner passes as --node-config
    barrier = threading.Barrier(REQUESTS)
    replies: list[RecordDict] = []

    def one() -> None:
        content = {wire.CONFIG: extend(plan, {wire.SHARD: 0, wire.ROUND: 1}), wire.ARRAYS: to_record(weights)}
        msg = Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)  # type: ignore[arg-type]
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        barrier.wait()
        replies.append(client.answer(client._train, msg, context))

    threads = [threading.Thread(target=one) for _ in range(REQUESTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    codes = sorted((r[wire.STATUS][wire.OUTCOME], r[wire.STATUS][wire.REASON]) for r in replies)
    assert codes == [(wire.OUTCOME_OK, "")] + [(wire.OUTCOME_REFUSED, wire.REFUSED_BUDGET)] * (REQUESTS - 1), codes
    assert sum(1 for r in replies if wire.ARRAYS in r) == 1
