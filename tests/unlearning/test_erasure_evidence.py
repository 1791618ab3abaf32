"""Evidence that an erasure forgets: the forgotten customers' membership signal (their loss under the
model) falls to that of customers the model never saw.

The run is deliberately overfit and without DP (a wide MLP, many local epochs, and eu holding most of
the customers so that FedAvg keeps eu's memorisation rather than averaging it away), so that before the
erasure the model's loss on its own training customers is clearly lower than on the hold-out: that is
the signal a membership-inference attack reads. After `forget` + `retrain`, the forgotten customers'
losses are compared with the hold-out's by a loss-threshold membership attack (Fisher's exact test)
and a two-sample Kolmogorov-Smirnov test.

The training's randomness is fresh each run, so every check is statistical, and one level, ``ALPHA``,
separates "a signal" (p < ALPHA) from "none" (p > ALPHA). A check of "no signal" fails by chance with
probability ALPHA when there is none (a p-value is uniform then), so ALPHA is small: at 0.05 the three
such checks would fail about one run in seven (a CI run saw p = 0.0498). The signals this test must see are
far stronger: over six runs (48399b6, 2026-11-30) the attack's p before the erasure was 2.6e-15 to 2.9e-8, on the
kept customers after it 1.3e-16 to 1.6e-8, and the "no signal" p-values 0.097 to 1.0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config
from scipy.stats import fisher_exact, ks_2samp

from fedcrm.commands.unlearning import forget_customers, retrain_run
from fedcrm.config import load_config
from fedcrm.data.schema import load_schema
from fedcrm.fl.simulation import run_simulated
from fedcrm.models import build_model, ensemble_proba, set_weights
from fedcrm.node_settings import region_settings
from fedcrm.region import Region
from fedcrm.runs import load_weights

SHARD = 0
PERMISSIVE = Path(__file__).resolve().parents[2] / "configs" / "policies" / "permissive.yaml"
N_FORGOTTEN = 100
ALPHA = 1e-3


def _losses(cfg, run: Path, x: np.ndarray, y: np.ndarray, *, shards: list[int]) -> np.ndarray:
    models = []
    for k in shards:
        m = build_model(cfg.model, n_features=x.shape[1], seed=0)
        set_weights(m, load_weights(run / "model" / f"constituent-{k}.npz"))
        models.append(m)
    p = np.clip(ensemble_proba(models, x.astype(np.float32)), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _attack_p(loss: np.ndarray, group: np.ndarray, reference: np.ndarray, alternative: str) -> float:
    """Yeom et al.'s loss-threshold membership attack at the threshold ln 2 (a wrong prediction): the
    p-value of Fisher's exact test that the group is called "member" (loss below it) more often than the
    reference customers. Losses are heavy-tailed (most near 0, a few confident mistakes), so the signal is
    in how often a customer is gotten wrong, which this test reads and a mean or KS test barely does.
    """
    wrong_g, wrong_r = int((loss[group] > np.log(2)).sum()), int((loss[reference] > np.log(2)).sum())
    table = [[len(group) - wrong_g, wrong_g], [len(reference) - wrong_r, wrong_r]]
    return float(fisher_exact(table, alternative=alternative).pvalue)


@pytest.mark.slow  # an overfit model on a larger region: minutes on 2 cores
def test_forgotten_customers_lose_their_membership_signal(tmp_path: Path) -> None:
    cfg = load_config(
        write_tiny_config(
            tmp_path,
            regions={"eu": 800, "us": 150},
            overrides={
                "unlearning.shards": 2,
                "privacy": {"mode": "none"},
                "model": {"kind": "mlp", "hidden": [256, 256]},
                "training": {
                    "rounds": 2,
                    "local_epochs": 60,
                    "batch_size": 32,
                    "optimizer": "adam",
                    "learning_rate": 0.01,
                },
                # Training without DP needs the regions' allowance (allow_non_private); the ledger records ε = ∞.
                "policies": {r: str(PERMISSIVE) for r in ("eu", "us")},
            },
        )
    )
    run, state = tmp_path / "run", tmp_path / "state"
    # Fixed region secrets: the same shards and hold-out on every run (the training's randomness is fresh
    # each run, as for any release; the checks below are statistical).
    for r in ("eu", "us"):
        (state / r).mkdir(parents=True)
        (state / r / "region_secret.key").write_text(f"{r}-test-secret-0123456789abcdef\n")
        (state / r / "region_secret.key").chmod(0o600)  # a key others can read is refused
    run_simulated(cfg, run_dir=run, state_root=state, report=lambda s: None)

    data = Region(region_settings(cfg, state_root=state)["eu"]).load(cfg, load_schema(cfg.schema_path))
    members = np.flatnonzero(~data.holdout & (data.shard == SHARD))
    forgotten, kept = members[:N_FORGOTTEN], members[N_FORGOTTEN:]
    holdout = np.flatnonzero(data.holdout)
    x, y = data.x, data.y.astype(np.float64)

    before = _losses(cfg, run, x, y, shards=[SHARD])
    assert before[forgotten].mean() < 0.6 * before[holdout].mean(), "the config no longer overfits: no signal"
    assert _attack_p(before, forgotten, holdout, "greater") < ALPHA

    forget_customers(region="eu", customer_ids=[str(i) for i in data.ids[forgotten]], state_root=state, runs=[run])
    result = retrain_run(run, state_root=state, report=lambda s: None)
    assert result.stale == [SHARD]

    after = _losses(cfg, run, x, y, shards=[SHARD])
    # The retrained constituent still remembers the customers it kept (the test can see a signal) ...
    assert _attack_p(after, kept, holdout, "greater") < ALPHA
    # ... but the forgotten ones now look like customers it never saw, to the attack and to a KS test.
    assert _attack_p(after, forgotten, holdout, "two-sided") > ALPHA
    assert ks_2samp(after[forgotten], after[holdout]).pvalue > ALPHA
    served = _losses(cfg, run, x, y, shards=[0, 1])
    assert _attack_p(served, forgotten, holdout, "two-sided") > ALPHA
