"""The server's weights and model spec cannot make a region's output depend on one customer without noise.

The attack (issue 23, item 2): the server writes a predicate as a network. Weights with ±inf or huge
entries, or a deep enough stack of weights under any bound that overflows float32, make the logit NaN
exactly for the customers whose feature j exceeds t. On 0.1's successor (before 0.2.0) the training
update was NaN iff such a customer was in the batch (ε = ∞ while the ledger recorded a finite ε), and
evaluation raised before charging, so every probe was a free yes/no about the hold-out. And the model's
size was unbounded: memory exhaustion at a hold-out's size is a side channel and a denial of service.

Every test drives the region as a server does, through the ClientApp's handlers, on real files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, write_tiny_config
from flwr.app import Context, Message, MessageType, RecordDict

from fedcrm import wire
from fedcrm.config import ExperimentConfig, ModelConfig, load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import Schema, load_schema
from fedcrm.fl import client as client_module
from fedcrm.fl.codec import extend, from_record, pack_constituents, plan_config, to_record
from fedcrm.models import build_model, get_weights, set_weights
from fedcrm.privacy.ledger import PrivacyLedger

Weights = dict[str, np.ndarray]

FEATURE = "tenure_months"  # the predicate's feature j: numeric, declared on [0, 120]
DEEP = ModelConfig(kind="mlp", hidden=(64,) * 10)  # deep enough that |w| <= 1e3 overflows float32
BOUND = 1e3  # the policy's default max_weight_abs
SCHEMA = REPO / "configs" / "schemas" / "synthetic_crm.yaml"


# -- the server's side: a plan, crafted weights, the messages ----------------------------------------


def _plan(tmp_path: Path, *, model: ModelConfig) -> tuple[ExperimentConfig, Schema, Path]:
    """A one-region run where every customer is in the one step of a round (q = 1), so a targeted
    customer is certainly in the batch; and the table it was written from."""
    overrides = {
        "model.kind": model.kind,
        "model.hidden": list(model.hidden),
        "training.batch_size": 100_000,
        "training.rounds": 1,
    }
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 400}, overrides=overrides))
    return cfg, load_schema(cfg.schema_path), Path(cfg.regions["eu"])


def _predicate_weights(cfg: ExperimentConfig, schema: Schema, *, threshold: float, scale: float) -> Weights:
    """A network whose logit is NaN exactly when the customer's ``FEATURE`` exceeds ``threshold`` (raw units).

    Every unit of the first layer is ``scale · (x_j − t)⁺``; each further layer multiplies the sum of the
    previous one by ``scale`` (finite for x_j ≤ t, where everything is 0; +inf soon after x_j > t); the
    output takes unit 0 minus unit 1, inf − inf = NaN.
    """
    encoder = FeatureEncoder(schema)
    j = encoder.feature_names.index(FEATURE)
    column = next(c for c in schema.model_columns if c.name == FEATURE)
    t = (threshold - column.min) / (column.max - column.min)  # type: ignore[union-attr]
    weights = {
        k: np.zeros_like(v)
        for k, v in get_weights(build_model(cfg.model, n_features=encoder.n_features, seed=0)).items()
    }
    weights["hidden0.weight"][:, j] = scale
    weights["hidden0.bias"][:] = -scale * t
    for i in range(1, len(cfg.model.hidden)):
        weights[f"hidden{i}.weight"][:] = scale
    weights["out.weight"][0, :2] = (scale, -scale)
    return weights


def _context(tmp_path: Path, *, data: Path, name: str = "st") -> Context:
    """Region ``eu``'s node: its table, its state folder and its own schema (the shipped one)."""
    node_config = {
        "region": "eu",
        "data-path": str(data),
        "state-dir": str(tmp_path / name),
        "schema-path": str(SCHEMA),
    }
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _message(cfg: ExperimentConfig, *, weights: Weights, kind: str) -> Message:
    plan = plan_config(cfg, schema_text=cfg.schema_path.read_text(encoding="utf-8"), run_id="probe")
    if kind == "train":
        content: dict[str, Any] = {
            wire.CONFIG: extend(plan, {wire.SHARD: 0, wire.ROUND: 1}),
            wire.ARRAYS: to_record(weights),
        }
        return Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)
    if kind == "evaluate":
        content = {wire.CONFIG: plan, wire.ARRAYS: pack_constituents([weights])}
        return Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.EVALUATE)
    content = {
        wire.CONFIG: extend(plan, {wire.ACTION: wire.ACTION_EVALUATE_SERVED}),
        wire.ARRAYS: pack_constituents([weights]),
    }
    return Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.QUERY)


HANDLERS = {"train": client_module._train, "evaluate": client_module._evaluate, "evaluate-served": client_module._query}


def _reply(
    tmp_path: Path, cfg: ExperimentConfig, *, weights: Weights, kind: str, data: Path, name: str = "st"
) -> RecordDict:
    context = _context(tmp_path, data=data, name=name)
    return client_module.answer(HANDLERS[kind], _message(cfg, weights=weights, kind=kind), context)


def _garbage_table(tmp_path: Path) -> Path:
    """A data file that fails to parse: a region that reads it cannot answer with a refusal code."""
    path = tmp_path / "unreadable.csv"
    path.write_bytes(b"\x00\xff\x00 this is not a customer table\n\x00,\x00\n" * 3)
    return path


def _assert_nan_exactly_on_the_predicate(
    cfg: ExperimentConfig, schema: Schema, weights: Weights, *, table: Path, threshold: float
) -> None:
    """The attack is live: under the default bound, the logit is NaN iff the customer's feature exceeds t."""
    from fedcrm.data.io import load_table

    assert max(float(np.abs(v).max()) for v in weights.values()) <= BOUND
    encoder = FeatureEncoder(schema)
    model = build_model(cfg.model, n_features=encoder.n_features, seed=0)
    set_weights(model, weights)
    customers = load_table(table, schema)
    with torch.no_grad():
        logits = model(torch.from_numpy(encoder.encode(customers))).squeeze(-1).numpy()
    targeted = customers.values[FEATURE].to_numpy(dtype=float) > threshold
    assert targeted.any() and not targeted.all()
    np.testing.assert_array_equal(np.isnan(logits), targeted)


def _split_on_predicate(table: Path, *, threshold: float) -> tuple[Path, Path, int]:
    """The table with the targeted customers, the same table without them, and how many were targeted."""
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    targeted = pd.to_numeric(frame[FEATURE]) > threshold
    without = table.with_name("without-targets.csv")
    frame[~targeted].to_csv(without, index=False)
    return table, without, int(targeted.sum())


def _events(tmp_path: Path, name: str = "st") -> int:
    return len(PrivacyLedger.open(tmp_path / name, region="eu").events())


def _assert_finite_reply(reply: RecordDict) -> dict[str, Any]:
    """The reply was answered (no error, no refusal) and everything in it is finite; its shape."""
    st = reply[wire.STATUS]
    assert st[wire.OUTCOME] == wire.OUTCOME_OK, dict(st)
    shape: dict[str, Any] = {"records": sorted(reply.keys())}
    if wire.ARRAYS in reply:
        arrays = from_record(reply[wire.ARRAYS])  # type: ignore[arg-type]
        assert all(np.all(np.isfinite(v)) for v in arrays.values()), "a non-finite update left the region"
        shape["arrays"] = {k: v.shape for k, v in arrays.items()}
    metrics = reply[wire.METRICS]
    for key, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value, dtype=np.float64))), (key, value)
    shape["metrics"] = {k: np.shape(v) for k, v in metrics.items()}
    return shape


# -- (a) refused before the table is read --------------------------------------------------------------


def _inf(w: Weights) -> Weights:
    return {**w, "hidden0.weight": np.where(w["hidden0.weight"] != 0, np.inf, 0.0).astype(np.float32)}


def _nan(w: Weights) -> Weights:
    return {**w, "out.bias": np.array([np.nan], dtype=np.float32)}


def _huge(w: Weights) -> Weights:
    return {k: v * 1e30 for k, v in w.items()}


def _over_bound(w: Weights) -> Weights:
    return {**w, "out.weight": np.full_like(w["out.weight"], 2 * BOUND)}


def _renamed(w: Weights) -> Weights:
    return {("_module." + k if k == "out.bias" else k): v for k, v in w.items()}


def _reshaped(w: Weights) -> Weights:
    return {**w, "hidden0.weight": w["hidden0.weight"][:, :-1]}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["train", "evaluate"])
@pytest.mark.parametrize("craft", [_inf, _nan, _huge, _over_bound, _renamed, _reshaped], ids=lambda f: f.__name__[1:])
def test_crafted_predicate_weights_are_refused_before_the_table_is_read(tmp_path: Path, kind: str, craft: Any) -> None:
    """Old code read the table first (this one does not parse: it failed with a data error) and then
    released NaN, or raised, depending on who matched the predicate."""
    cfg, schema, table = _plan(tmp_path, model=ModelConfig(kind="mlp", hidden=(8, 8)))
    weights = craft(_predicate_weights(cfg, schema, threshold=60, scale=1.0))
    reply = _reply(tmp_path, cfg, weights=weights, kind=kind, data=_garbage_table(tmp_path))
    st = reply[wire.STATUS]
    assert st[wire.OUTCOME] == wire.OUTCOME_REFUSED, dict(st)
    assert st[wire.REASON] == wire.REFUSED_WEIGHTS
    assert _events(tmp_path) == 0  # nothing charged, nothing released


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["train", "evaluate", "evaluate-served"])
def test_a_huge_model_spec_is_refused_before_the_table_is_read(tmp_path: Path, kind: str) -> None:
    """50,000 × 50,000 hidden units (2.5e9 parameters, 10 GB to build): old code opened the table first
    (here one that does not parse) and would then build whatever the server named."""
    cfg, _, _ = _plan(tmp_path, model=ModelConfig(kind="logistic"))
    huge = cfg.with_overrides({"model.kind": "mlp", "model.hidden": [50_000, 50_000]})
    small = {"out.weight": np.zeros((1, 3), dtype=np.float32), "out.bias": np.zeros(1, dtype=np.float32)}
    reply = _reply(tmp_path, huge, weights=small, kind=kind, data=_garbage_table(tmp_path))
    st = reply[wire.STATUS]
    assert st[wire.OUTCOME] == wire.OUTCOME_REFUSED, dict(st)
    assert st[wire.REASON] == wire.REFUSED_MODEL_SIZE
    assert _events(tmp_path) == 0


# -- (b) weights under the bound that still overflow: the mechanism absorbs them -------------------------


def _probe_with_and_without_targets(
    tmp_path: Path, *, kind: str, threshold: float, charged: int
) -> tuple[dict[str, Any], dict[str, Any], Weights]:
    """The server's probe for "tenure > threshold" sent to the table with the targeted customers and to the
    same table without them: the shapes of both replies (each checked answered, finite and charged)."""
    cfg, schema, table = _plan(tmp_path, model=DEEP)
    weights = _predicate_weights(cfg, schema, threshold=threshold, scale=BOUND)
    _assert_nan_exactly_on_the_predicate(cfg, schema, weights, table=table, threshold=threshold)
    with_targets, without_targets, targeted = _split_on_predicate(table, threshold=threshold)
    assert targeted > 0
    shapes = []
    for name, data in (("with", with_targets), ("without", without_targets)):
        reply = _reply(tmp_path, cfg, weights=weights, kind=kind, data=data, name=name)
        shapes.append(_assert_finite_reply(reply))
        assert _events(tmp_path, name) == charged  # every release charged before it left
    return shapes[0], shapes[1], weights


@pytest.mark.usefixtures("task_identity", "one_thread")
def test_weights_that_make_targeted_customers_nan_leave_a_finite_update_with_or_without_them(tmp_path: Path) -> None:
    """Old code released a NaN update iff a customer with tenure > 60 was in the batch (here: always)."""
    with_targets, without_targets, weights = _probe_with_and_without_targets(
        tmp_path, kind="train", threshold=60, charged=1
    )
    assert with_targets == without_targets
    assert with_targets["arrays"] == {k: v.shape for k, v in weights.items()}


@pytest.mark.usefixtures("task_identity", "one_thread")
@pytest.mark.parametrize(("kind", "answers"), [("evaluate", 1), ("evaluate-served", 2)])
def test_weights_that_make_targeted_scores_nan_get_a_charged_finite_answer_with_or_without_them(
    tmp_path: Path, kind: str, answers: int
) -> None:
    """Old code raised before charging when a hold-out customer matched: 30 probes found the hold-out's
    maximum of a feature to 7 digits with 0 ledger events."""
    with_targets, without_targets, _ = _probe_with_and_without_targets(
        tmp_path, kind=kind, threshold=30, charged=answers
    )
    assert with_targets == without_targets


def test_dp_sgd_gives_a_nan_row_the_weight_of_an_absent_customer() -> None:
    """One DP-SGD step on a batch with a targeted customer equals the step without them, noise and all:
    old code returned a NaN gradient for the whole batch."""
    from fedcrm.privacy.clipping import LinearStackDpSgd
    from fedcrm.privacy.randomness import ReleaseRandomness

    torch.manual_seed(0)
    x = torch.rand(50, 6) * 0.4  # every feature below the threshold 0.5 ...
    x[7, 2] = 0.9  # ... but customer 7's
    y = (torch.rand(50) > 0.5).float()
    model = build_model(DEEP, n_features=6, seed=0)
    j, t = 2, 0.5
    weights = {k: np.zeros_like(v) for k, v in get_weights(model).items()}
    weights["hidden0.weight"][:, j], weights["hidden0.bias"][:] = BOUND, -BOUND * t
    for i in range(1, len(DEEP.hidden)):
        weights[f"hidden{i}.weight"][:] = BOUND
    weights["out.weight"][0, :2] = (BOUND, -BOUND)
    grads = []
    for rows in (torch.arange(50), torch.tensor([i for i in range(50) if i != 7])):
        set_weights(model, weights)
        step = LinearStackDpSgd(
            model,  # type: ignore[arg-type]
            noise_multiplier=1.0,
            clipping_norm=1.0,
            expected_batch_size=50,
            randomness=ReleaseRandomness.reproducible(region_secret="secret", nonce="one-step"),
        )
        step.compute_grads(x[rows], y[rows])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})  # type: ignore[union-attr]
    for k in grads[0]:
        assert torch.isfinite(grads[0][k]).all(), k
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


def test_every_shipped_config_fits_the_default_model_bounds() -> None:
    """The default max_parameters admits every model in configs/ and the tests' largest (256 × 256)."""
    from fedcrm.governance.policy import RegionPolicy
    from fedcrm.model_limits import check_model_spec, parameter_shapes

    policy = RegionPolicy()
    repo = Path(__file__).resolve().parents[2]
    specs = [
        (load_config(p).model, load_schema(load_config(p).schema_path))
        for p in sorted((repo / "configs").glob("*.yaml"))
    ]
    specs.append((ModelConfig(kind="mlp", hidden=(256, 256)), specs[0][1]))
    for spec, schema in specs:
        n = FeatureEncoder(schema).n_features
        check_model_spec(policy, region="eu", spec=spec, n_features=n)
        built = build_model(spec, n_features=n, seed=0).state_dict()
        assert parameter_shapes(spec, n_features=n) == {k: tuple(v.shape) for k, v in built.items()}
