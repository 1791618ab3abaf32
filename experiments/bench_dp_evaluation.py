"""What the DP evaluation answers cost: pooled AUC and fairness gaps, exact vs as the regions answer them.

Trains the shipped config once (Telco churn, Bank propensity), then, for the served model, computes
every region's hold-out answers twice: exactly (what fedcrm 0.1 sent) and as DP answers, with the
regions' default policy (Gaussian noise of multiplier ``evaluation_noise`` × the answer's sensitivity,
coarse histograms, clipped sums: ``Region.evaluate`` / ``Region.trust_summary``'s own parts and
``fedcrm.privacy.aggregates.noised``). The DP answers are drawn ``--draws`` times without charging a
ledger (this is a measurement of their noise, run by the data owner on their own data). Prints a
table and writes JSON.

    .venv/bin/python experiments/bench_dp_evaluation.py --datasets telco,bank --draws 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from bench_erasure import dataset_config  # noqa: E402


def exact_and_noisy(cfg: Any, *, run_dir: Path, state_root: Path, draws: int) -> dict[str, Any]:
    from fedcrm.data.schema import load_schema
    from fedcrm.evaluation import fairness
    from fedcrm.evaluation.metrics import ScoreSummary
    from fedcrm.evaluation.served import ServedModel
    from fedcrm.governance.policy import RegionPolicy
    from fedcrm.privacy.aggregates import ANSWER_BINS, ANSWER_LOGIT_RANGE, LOSS_CAP, noised
    from fedcrm.privacy.randomness import ReleaseRandomness
    from fedcrm.region import NodeSettings, Region

    schema = load_schema(cfg.schema_path)
    served = ServedModel.load(run_dir)
    sigma = RegionPolicy().evaluation_noise
    exact_parts: list[ScoreSummary] = []
    groups: list[fairness.FairnessSummary] = []
    for region, path in cfg.regions.items():
        r = Region(
            NodeSettings(
                region=region, data_path=Path(path), state_dir=state_root / region, schema_path=cfg.schema_path
            )
        )
        data = r.load(cfg, schema)
        x, y = data.x[data.holdout], data.y[data.holdout]
        scores = served.proba(x)
        exact_parts.append(
            ScoreSummary.of(
                scores=scores, labels=y, bins=ANSWER_BINS, loss_cap=LOSS_CAP, logit_range=ANSWER_LOGIT_RANGE
            )
        )
        sensitive = data.sensitive.iloc[np.flatnonzero(data.holdout)].reset_index(drop=True)
        groups.append(
            fairness.summarise_groups(scores=scores, labels=y, sensitive=sensitive, schema=schema, min_customers=1)
        )
    exact = exact_parts[0]
    for part in exact_parts[1:]:
        exact = exact + part
    fine = ScoreSummary()  # the 0.1 wire: 2,000 bins, no noise
    for region, path in cfg.regions.items():
        r = Region(
            NodeSettings(
                region=region, data_path=Path(path), state_dir=state_root / region, schema_path=cfg.schema_path
            )
        )
        data = r.load(cfg, schema)
        fine = fine + ScoreSummary.of(scores=served.proba(data.x[data.holdout]), labels=data.y[data.holdout])

    def gaps(summaries: list[fairness.FairnessSummary]) -> dict[str, float]:
        pooled = summaries[0]
        for s in summaries[1:]:
            pooled = fairness.add(pooled, s)
        report = fairness.fairness_report(pooled, schema=schema)
        return {a: float(v["demographic_parity_difference"] or np.nan) for a, v in report.items()}

    exact_gaps = gaps(groups)
    aucs, gap_draws = [], []
    for _ in range(draws):
        total: ScoreSummary | None = None
        noisy_groups = []
        for part, g in zip(exact_parts, groups, strict=True):
            rnd = ReleaseRandomness.secure()
            a = noised(
                {
                    "p": part.hist_pos,
                    "n": part.hist_neg,
                    "l": part.sum_log_loss / LOSS_CAP,
                    "b": part.sum_brier,
                    "c": part.correct,
                },
                coordinates_per_customer=4,
                noise_multiplier=sigma,
                randomness=rnd,
            )
            s = ScoreSummary(
                hist_pos=a["p"],
                hist_neg=a["n"],
                sum_log_loss=float(a["l"]) * LOSS_CAP,
                sum_brier=float(a["b"]),
                correct=float(a["c"]),
            )
            total = s if total is None else total + s
            parts = {
                f"{k}/{w}": getattr(h, f)
                for k, h in g.items()
                for w, f in (("pos", "hist_pos"), ("neg", "hist_neg"), ("score", "sum_score"))
            }
            b = noised(parts, coordinates_per_customer=2 * len(g) + 2, noise_multiplier=sigma, randomness=rnd)
            noisy_groups.append(
                fairness.from_lists(
                    hist_pos=np.concatenate([b[f"{k}/pos"].ravel() for k in g]),
                    hist_neg=np.concatenate([b[f"{k}/neg"].ravel() for k in g]),
                    sum_score=np.concatenate([b[f"{k}/score"] for k in g]),
                    suppressed=np.zeros(sum(len(h.sum_score) for h in g.values()), dtype=np.int64),
                    schema=schema,
                )
            )
        assert total is not None
        aucs.append(total.metrics()["auc"])
        gap_draws.append(gaps(noisy_groups))
    gap_err = {a: float(np.nanmean([abs(d[a] - exact_gaps[a]) for d in gap_draws])) for a in exact_gaps}
    return {
        "holdout_customers": exact.n,
        "evaluation_noise": sigma,
        "auc_exact_2000_bins": fine.metrics()["auc"],
        "auc_exact_20_bins": exact.metrics()["auc"],
        "auc_dp_mean": float(np.mean(aucs)),
        "auc_dp_std": float(np.std(aucs)),
        "auc_dp_abs_error_mean": float(np.mean(np.abs(np.array(aucs) - fine.metrics()["auc"]))),
        "demographic_parity_exact": exact_gaps,
        "demographic_parity_dp_abs_error_mean": gap_err,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="telco,bank")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_dp_evaluation")
    args = p.parse_args()
    from fedcrm.fl.simulation import run_simulated

    results = {}
    for name in args.datasets.split(","):
        work = args.out / name
        cfg = dataset_config(name, data_dir=work / "data", customers=0)
        run_dir, state = work / "run", work / "state"
        if not (run_dir / "summary.json").exists():
            run_simulated(cfg, run_dir=run_dir, state_root=state, report=lambda s: None)
        results[name] = exact_and_noisy(cfg, run_dir=run_dir, state_root=state, draws=args.draws)
        r = results[name]
        print(
            f"{name}: hold-out {r['holdout_customers']:.0f} customers, σ_eval {r['evaluation_noise']}: pooled AUC "
            f"exact {r['auc_exact_2000_bins']:.4f} (20 bins {r['auc_exact_20_bins']:.4f}), DP answers "
            f"{r['auc_dp_mean']:.4f} ± {r['auc_dp_std']:.4f} (mean |error| {r['auc_dp_abs_error_mean']:.4f}); "
            f"demographic parity exact {r['demographic_parity_exact']}, DP mean |error| "
            f"{r['demographic_parity_dp_abs_error_mean']}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
