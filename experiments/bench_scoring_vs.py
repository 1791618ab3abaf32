"""Benchmark: `fedcrm score` of this tree against an older commit side by side: speed, and equal output bytes.

The same table, served model and tombstone as ``bench_scoring.py``; each measurement in a fresh child
process that imports the code of one tree (``git archive`` of ``--baseline`` in a temporary folder, or
this tree), loads the model, then scores the first N customers to CSV and to Parquet, without and with
reasons. Old and new alternate, so a change in the machine's load falls on both (``--repeat N``: N
runs each, the one with the least CPU time shown). Prints rows per CPU second (the child's CPU time,
its threads included) next to rows per wall second and the load average, and ``cmp`` of the two
trees' output files.

    .venv/bin/python experiments/bench_scoring_vs.py --baseline 25bb93a --customers 200000 1000000
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_scoring import REPO, make_run, synth_table

# Runs in the child, with the tree under test first on sys.path.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from fedcrm.scoring import ScoringModel, score_region
run, table, state, out, reasons = sys.argv[1:6]
scorer = ScoringModel.load(run)
cpu, wall = time.process_time(), time.perf_counter()
r = score_region(region="eu", model=scorer, data=Path(table), state_dir=Path(state), out=Path(out),
                 reasons=int(reasons), chunk_rows=100_000)
print(json.dumps({"rows": r.counts["customers_in_table"], "cpu": time.process_time() - cpu,
                  "wall": time.perf_counter() - wall,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def score_in_child(tree: Path, *, run: Path, table: Path, state: Path, out: Path, reasons: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_TELEMETRY_ENABLED": "0"}
    args = [sys.executable, "-c", CHILD, str(run), str(table), str(state), str(out), str(reasons)]
    done = subprocess.run(args, env=env, cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the commit to compare with (git rev)")
    ap.add_argument("--customers", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--reasons", type=int, nargs="+", default=[0, 3])
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per tree and line, alternating; the least CPU time is shown"
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scoring")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from fedcrm.unlearning.tombstones import Tombstones

    full = synth_table(args.out, customers=max(args.customers))
    run, state = args.out / "run-logistic", args.out / "state-vs" / "eu"
    make_run(run, data=full, kind="logistic")
    Tombstones(state).add(["eu-0000001"])
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        old = Path(tmp) / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        print(f"baseline {args.baseline} vs this tree; load average at each line (1 min)")
        print(
            f"{'rows':>9} {'reasons':>7} {'out':<7} {'tree':<8} {'CPU s':>6} {'rows/CPU-s':>10} "
            f"{'wall s':>6} {'rows/s':>8} {'peak MiB':>8} {'load':>5} {'same bytes':>10}"
        )
        for n in args.customers:
            table = full
            if n < max(args.customers):
                table = args.out / f"first-{n}.csv"
                if not table.exists():
                    with full.open("rb") as src, table.open("wb") as dst:
                        dst.writelines(line for _, line in zip(range(n + 1), src, strict=False))
            for reasons in args.reasons:
                for kind in ("csv", "parquet"):
                    outs, best = {}, {}
                    for _ in range(args.repeat):  # old, new, old, new...: a change of load falls on both
                        for name, tree in (("baseline", old), ("new", REPO)):
                            outs[name] = Path(tmp) / f"{name}-{n}-{reasons}.{kind}"
                            r = score_in_child(tree, run=run, table=table, state=state, out=outs[name], reasons=reasons)
                            best[name] = min(best.get(name, r), r, key=lambda m: m["cpu"])
                    for name, r in best.items():
                        same = (
                            "" if name == "baseline" else str(filecmp.cmp(outs["baseline"], outs[name], shallow=False))
                        )
                        print(
                            f"{r['rows']:>9} {reasons:>7} {kind:<7} {name:<8} {r['cpu']:>6.2f} "
                            f"{r['rows'] / r['cpu']:>10,.0f} {r['wall']:>6.2f} {r['rows'] / r['wall']:>8,.0f} "
                            f"{r['peak_mib']:>8.0f} {os.getloadavg()[0]:>5.1f} {same:>10}",
                            flush=True,
                        )
                    for p in outs.values():
                        p.unlink()


if __name__ == "__main__":
    main()
