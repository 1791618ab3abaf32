"""Progress bars for long commands (``fedcrm sweep``, ``fedcrm retrain``), on stderr, for people only.

A bar is drawn only when both stdout and stderr are terminals: a script that pipes or redirects
either stream (``fedcrm sweep --json > cells.json``, CI logs) gets the plain log lines and no control
characters. The log lines still go out above the bar, through the same console.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# The federated server's per-round log line ("round   3/20 shard 2/4: ..."): one training round done.
ROUND_LINE = re.compile(r"^round\s+\d+/(?P<rounds>\d+)")
# The retrain's opening line ("retraining shard(s) [0, 2] of 4 ..."): how many shards it trains.
RETRAIN_LINE = re.compile(r"^retraining shard\(s\) \[(?P<shards>[\d, ]*)\]")


def interactive() -> bool:
    """Whether a person watches: stdout and stderr both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressBar:
    """One bar with a description and a count; a no-op when nobody watches (see :func:`interactive`)."""

    def __init__(self, *, description: str, total: int | None, console: Console, enabled: bool | None = None):
        self.enabled = interactive() if enabled is None else enabled
        self.console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, *, completed: int | None = None, total: int | None = None, advance: int = 0) -> None:
        self._progress.update(self._task, completed=completed, total=total, advance=advance)

    @property
    def completed(self) -> int:
        return int(self._progress.tasks[0].completed)

    @property
    def total(self) -> int | None:
        t = self._progress.tasks[0].total
        return None if t is None else int(t)

    def log(self, line: str) -> None:
        """A log line above the bar (plain text: region names and reasons are not rich markup)."""
        self.console.print(line, markup=False, highlight=False)


def counting_rounds(bar: ProgressBar) -> Callable[[str], None]:
    """A ``report`` callback that logs each line and advances ``bar`` by one per finished training round.

    The total is rounds × shards retrained, read off the retrain's opening line and the first round line.
    """
    shards = [1]

    def report(line: str) -> None:
        bar.log(line)
        if m := RETRAIN_LINE.match(line):
            shards[0] = max(1, len([s for s in m["shards"].split(",") if s.strip()]))
        elif m := ROUND_LINE.match(line):
            if bar.total is None:
                bar.update(total=int(m["rounds"]) * shards[0])
            bar.update(advance=1)

    return report
