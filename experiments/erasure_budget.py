"""How many erasure retrains a region's budget serves, with and without `unlearning.reserve_retrains`.

For each shipped config (Telco, Bank) at S shards, each region plans σ exactly as it will
(`Region.noise_multiplier`: its declared size over S (`Region.declared_shard`), the rounds × local epochs, the
target ε, and room for K reserved retrains). The initial training and each retrain of a shard are the
same release; the table gives the ε a shard spends on its initial training, what the default budget
(ε = 10) leaves, and how many retrains fit before the region refuses. Accountant arithmetic only (the
figures are exact for the ledger; nothing is trained).

    .venv/bin/python experiments/erasure_budget.py --datasets telco,bank --shards 8 --reserve 0,3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from bench_erasure import dataset_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="telco,bank")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--reserve", default="0,3")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "erasure_budget")
    args = ap.parse_args()

    from fedcrm.data.schema import load_schema
    from fedcrm.governance.policy import RegionPolicy
    from fedcrm.privacy.accountant import GaussianRelease, epsilon
    from fedcrm.region import NodeSettings, Region
    from fedcrm.training import sampling_plan

    policy = RegionPolicy()
    print(
        f"| dataset | S | K reserved | smallest shard (declared) | σ | ε of the initial training | ε left of "
        f"{policy.privacy_budget:g} | retrains that fit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        cfg = dataset_config(name, data_dir=args.out / f"{name}-regions", customers=0)
        schema = load_schema(cfg.schema_path)
        sizes = []
        for region, path in cfg.regions.items():
            r = Region(
                NodeSettings(
                    region=region,
                    data_path=Path(path),
                    state_dir=args.out / "state" / region,
                    schema_path=cfg.schema_path,
                )
            )
            sizes.append(r.declared_shard(cfg.with_overrides({"unlearning.shards": args.shards}), schema))
        for k in (int(x) for x in args.reserve.split(",")):
            c = cfg.with_overrides({"unlearning.shards": args.shards, "unlearning.reserve_retrains": k})
            region = Region(NodeSettings(region="probe", data_path=Path("-"), state_dir=args.out / "state" / "probe"))
            n = min(sizes)  # each region's declared size over S, as it plans its rounds
            sigma = region.noise_multiplier(c, n=n)
            q, steps = sampling_plan(n=n, batch_size=c.training.batch_size, epochs=c.training.local_epochs)
            one = GaussianRelease(sigma, q, steps * c.training.rounds)
            first = epsilon([one], delta=policy.delta, accountant=c.privacy.accountant)
            fits = 0
            while (
                fits < 100
                and epsilon([one] * (fits + 2), delta=policy.delta, accountant=c.privacy.accountant)
                <= policy.privacy_budget
            ):
                fits += 1
            print(
                f"| {name} | {args.shards} | {k} | {n} | {sigma:.3f} | {first:.3f} | "
                f"{policy.privacy_budget - first:.3f} | {fits} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
