"""The coordinator's warm ServerApp executor: ``fedcrm server exec``, next to ``flower-superlink --isolation process``.

With ``--isolation subprocess`` the SuperLink starts Flower's SuperExec, which starts a fresh
``flwr-serverapp`` interpreter for every run: a run (a training, a sweep cell, an erasure retrain) first
waits for the SuperExec's 1 s poll, then for that interpreter to import torch and fedcrm. With
``--isolation process`` the SuperLink starts no ServerApp itself; this executor asks its Runtime API
for ServerApp tasks and runs each in a fork of itself, which imported Flower's ServerApp runtime and
fedcrm once, at start (:mod:`fedcrm.deploy.executor`). The child runs ``flwr-serverapp``'s own code: it
pulls the run and its bundle, installs the bundle, loads the ServerApp from it and streams its log to
the SuperLink, as the fresh process would.

Nothing here decides a release: the ServerApp is the server's own code in every mode, and what a region
answers is decided at the region (its policy, its secret, its bundle gate).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedcrm.deploy.executor import Task, TaskRunner, run_executor

__all__ = ["run_server_exec", "run_serverapp_task", "serverapp_command"]


def serverapp_command(task: Task) -> list[str]:
    """Flower's ``flwr-serverapp`` for one run (the fresh-interpreter way, as Flower's SuperExec starts it)."""
    exe = Path(sys.executable).parent / "flwr-serverapp"
    return [str(exe) if exe.exists() else "flwr-serverapp", *task.argv()]


def run_serverapp_task(task: Task) -> None:
    """One run, in this process, through ``flwr-serverapp``'s code (flwr 1.42: ``flwr_serverapp``'s body)."""
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.superlink.runtime import run_serverapp

    log_queue: Queue[str | None] = Queue()  # what `flwr log` streams: this run's stdout and stderr
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(
            runtime_api_address=task.runtime_api_address,
            log_queue=log_queue,
            token=task.token,
            insecure=task.insecure,
            certificates=task.certificates(),
            parent_pid=task.parent_pid,
            runtime_dependency_install=False,  # the coordinator installs nothing a bundle asks for
        )
    finally:
        restore_output()


def _preload() -> None:
    """Import, once, what every ServerApp needs: the runs forked from this process start with it."""
    import flwr.serverapp  # noqa: F401
    import flwr.superlink.runtime.run_serverapp  # noqa: F401

    import fedcrm.fl.server  # noqa: F401 - torch, numpy, the strategy, the run's results and reports


def run_server_exec(
    *, runtime_api_address: str, insecure: bool, root_certificates: str | None, parent_pid: int | None, spawn: bool
) -> None:
    """Ask the SuperLink for ServerApp tasks forever; run each in a fork of this process (or ``flwr-serverapp``)."""
    from flwr.supercore.constant import TaskType

    runner = TaskRunner(task_type=TaskType.SERVER_APP, name="server exec", preload=_preload,
                        run=run_serverapp_task, argv=serverapp_command)  # fmt: skip
    run_executor(runner, runtime_api_address=runtime_api_address, insecure=insecure,
                 root_certificates=root_certificates, parent_pid=parent_pid, spawn=spawn)  # fmt: skip
