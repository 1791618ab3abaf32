"""Memory of a whole process tree (a simulation's driver, Ray's daemons and its actors), from /proc.

psutil is not installed here, so this reads ``/proc`` directly (Linux only). Two figures per sample:
the sum of RSS (counts shared pages such as torch's libraries once per process, so it over-states
what the machine spends) and the sum of PSS (shared pages split between their users: what the tree
really costs). The biggest single process whose command line names a Flower ClientApp actor is kept
too, for "memory per simulated client".
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
ACTOR_MARKERS = ("ClientAppActor", "flwr-clientapp")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _pss_rss(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def _is_actor(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except OSError:
        return False
    return any(m in cmd for m in ACTOR_MARKERS)


@dataclass
class Peak:
    pss: int = 0
    rss: int = 0
    actor_rss: int = 0
    processes: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, tree PSS)


class TreeSampler:
    """Samples the tree under ``root`` every ``interval`` seconds in a thread; keeps the peaks."""

    def __init__(self, root: int, *, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.peak = Peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        pids = tree(self.root)
        pss = rss = actor = 0
        for pid in pids:
            p, r = _pss_rss(pid)
            pss, rss = pss + p, rss + r
            if r > actor and _is_actor(pid):
                actor = r
        pk = self.peak
        pk.pss, pk.rss, pk.actor_rss = max(pk.pss, pss), max(pk.rss, rss), max(pk.actor_rss, actor)
        pk.processes = max(pk.processes, len(pids))
        pk.samples.append((time.time(), pss))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def simulate_marking_rounds(cfg: object, out: Path) -> None:
    """Runs inside a measured process: one fedcrm simulation, writing when each round ended to
    ``out/marks.json`` (with the final AUC) for the parent to split the wall time."""
    import json

    from fedcrm.fl.simulation import run_simulated

    ends: list[float] = []

    def report(line: str) -> None:
        if line.startswith("round"):
            ends.append(time.time())

    summary = run_simulated(cfg, run_dir=out / "run", state_root=out / "state", report=report)  # type: ignore[arg-type]
    epsilon = {r: p["epsilon"] for r, p in summary.privacy.items() if p.get("epsilon") is not None}
    (out / "marks.json").write_text(
        json.dumps({"round_ends": ends, "auc": summary.final_metrics["auc"], "epsilon": epsilon})
    )
