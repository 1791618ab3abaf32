"""The white-box one-run audit's figures (docs/results.md, "Privacy audit").

1. The shipped configs' settings (σ, q and steps as the smallest region plans them, policy δ = 1e-6):
   the real DP-SGD path and the two planted bugs.
2. Power at ε = 8: what ε_lb the audit reaches against an honest mechanism, by setting and canaries.

    PYTHONPATH=. python experiments/audit_power.py [--repeats 3] [--max-canaries 100000]

A small synthetic table stands in for the region's (the canaries' coordinates never see it); q and
the steps come from the declared size, as in a region.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedcrm.config import ExperimentConfig, ModelConfig, TrainingConfig, load_config
from fedcrm.evaluation.white_box_audit import PlantedBug, WhiteBoxAudit, white_box_audit
from fedcrm.privacy.accountant import plan_noise_multiplier
from fedcrm.region import NodeSettings, Region
from fedcrm.training import sampling_plan

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"demo": 2400, "churn_telco_dp": 1900, "propensity_bank_dp": 9000}  # smallest region's declared size
DELTA = 1e-6


def _table(n: int, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] + rng.normal(size=n) > 0.5).astype(np.float32)


def _run(
    *,
    n: int,
    model: ModelConfig,
    training: TrainingConfig,
    sigma: float,
    planned: int,
    canaries: int,
    seed: int,
    bug: PlantedBug | None = None,
) -> WhiteBoxAudit:
    x, y = _table(n)
    return white_box_audit(
        x=x,
        y=y,
        model=model,
        training=training,
        noise_multiplier=sigma,
        clipping_norm=1.0,
        delta=DELTA,
        planned_customers=planned,
        canaries=canaries,
        auditor_rng=np.random.default_rng(seed),
        planted_bug=bug,
    )


def _row(label: str, audits: list[WhiteBoxAudit], seconds: float) -> str:
    lbs = [a.epsilon_lower_bound for a in audits]
    a = audits[0]
    return (
        f"| {label} | {a.noise_multiplier:.3f} | {a.sample_rate:.4f} | {a.steps_per_round}×{a.rounds} | "
        f"{a.result.canaries:,} | {a.claimed_epsilon:.2f} | {np.mean(lbs):.2f} ({min(lbs):.2f}–{max(lbs):.2f}) | "
        f"{a.verdict} | {seconds / len(audits):.1f} |"
    )


def shipped(repeats: int) -> None:
    print("| setting | σ | q | steps × rounds | canaries | claimed ε | ε_lb mean (min–max) | verdict | s/audit |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, declared in SHIPPED.items():
            cfg: ExperimentConfig = load_config(REPO / "configs" / f"{name}.yaml")
            region = Region(NodeSettings(region="r", data_path=Path(tmp) / "x.csv", state_dir=Path(tmp) / name))
            sigma = region.noise_multiplier(cfg, n=declared)
            for bug in (None, PlantedBug.PUBLIC_SEED, PlantedBug.SIGMA_OVER_10):
                t = time.perf_counter()
                audits = [
                    _run(
                        n=400,
                        model=cfg.model,
                        training=cfg.training,
                        sigma=sigma,
                        planned=declared,
                        canaries=1000,
                        seed=s,
                        bug=bug,
                    )
                    for s in range(repeats)
                ]
                label = f"{name}, {'real path' if bug is None else bug.value}"
                print(_row(label, audits, time.perf_counter() - t), flush=True)


def power(repeats: int, max_canaries: int) -> None:
    print("| setting | σ | q | steps × rounds | canaries | claimed ε | ε_lb mean (min–max) | verdict | s/audit |")
    print("|---|---|---|---|---|---|---|---|---|")
    logistic = ModelConfig(kind="logistic")
    # Telco's setting: 8 Poisson-sampled steps per round, the server sees their sum once a round.
    telco = TrainingConfig(rounds=10, local_epochs=1, batch_size=256, learning_rate=0.05)
    q, steps = sampling_plan(n=1900, batch_size=256, epochs=1)
    sigma_telco = plan_noise_multiplier(
        target_epsilon=8, delta=DELTA, sample_rate=q, steps=steps * 10, accountant="rdp"
    )
    # The audit's best case: one full-batch step per round (q = 1), so the server sees every step.
    full = TrainingConfig(rounds=10, local_epochs=1, batch_size=100, learning_rate=0.05)
    sigma_full = plan_noise_multiplier(target_epsilon=8, delta=DELTA, sample_rate=1.0, steps=10, accountant="rdp")
    for label, training, sigma, n, planned in (
        ("Telco setting, ε = 8", telco, sigma_telco, 400, 1900),
        ("full batch, 1 step/round, ε = 8", full, sigma_full, 100, 100),
    ):
        for m in (1000, 10_000, 100_000):
            if m > max_canaries or (m > 10_000 and training is telco):
                continue
            t = time.perf_counter()
            audits = [
                _run(n=n, model=logistic, training=training, sigma=sigma, planned=planned, canaries=m, seed=s)
                for s in range(repeats)
            ]
            print(_row(label, audits, time.perf_counter() - t), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-canaries", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped(args.repeats)
    print()
    power(args.repeats, args.max_canaries)


if __name__ == "__main__":
    main()
