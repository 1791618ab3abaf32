"""A warm SuperExec: take Flower tasks from a Runtime API and run each in a fork of a pre-imported process.

Flower 1.42 runs every ServerApp (one per run, on the SuperLink) and every ClientApp (one per message,
on each SuperNode) in a process of its own, started by a SuperExec that asks the component's Runtime
API for tasks (``flwr.supercore.superexec.run_superexec``) and starts ``flwr-serverapp`` /
``flwr-clientapp`` for each. Each such process spends seconds importing torch, Opacus, Flower and
fedcrm before it works for a fraction of a second (docs/benchmarks.md §5). This loop is that SuperExec
with one change: it imports those libraries once, at start, and forks itself per task (POSIX), so a
task starts in milliseconds. The child runs the task through Flower's own process code, exactly as the
fresh process would, and ends with ``os._exit``: nothing of a task (its bundle on ``sys.path``, a patch
of Flower's code) reaches the executor or the next task. Where there is no ``fork`` (or with ``spawn``)
each task gets a fresh interpreter, as with Flower's own SuperExec.

What is preloaded is the installed library only, never a bundle's modules (``server``, ``clients``):
a bundle's code is imported by the child from the bundle it pulled, as in a fresh process. Fork keeps
no release randomness either: every DP release draws from a fresh OS key (``secrets``) in the child.

Users: :mod:`fedcrm.deploy.gate` (a region's ClientApps, each behind its bundle check) and
:mod:`fedcrm.deploy.server_exec` (the coordinator's ServerApps).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcrm.errors import FederationError

__all__ = ["BUNDLE_MODULES", "Task", "TaskRunner", "fork_task", "reap", "run_executor"]

log = logging.getLogger("fedcrm.deploy")
# How often the executor asks its Runtime API for a task when none was waiting: a local HTTP call, cheap,
# while each second here is a second of every task's latency (Flower's own SuperExec: 1 s).
POLL_S = 0.2
# The top-level packages of fedcrm's app bundle: the child imports them from the bundle, never the parent.
BUNDLE_MODULES = ("server", "clients")


@dataclass(frozen=True)
class Task:
    """One task taken from a Runtime API: where its process pulls it from, with which token; the process
    ends when ``parent_pid`` does."""

    runtime_api_address: str
    token: str
    insecure: bool
    root_certificates: str | None
    parent_pid: int | None

    def argv(self) -> list[str]:
        """The options Flower's app processes (``flwr-serverapp``, ``flwr-clientapp``) take for this task."""
        argv = ["--runtime-api-address", self.runtime_api_address, "--token", self.token]
        if self.insecure:
            argv.append("--insecure")
        elif self.root_certificates is not None:
            argv += ["--root-certificates", self.root_certificates]
        if self.parent_pid is not None:
            argv += ["--parent-pid", str(self.parent_pid)]
        return argv

    def certificates(self) -> bytes | None:
        """The Runtime API's root certificates, read as Flower's app processes read them."""
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        return validate_and_resolve_root_certificates(self.root_certificates, self.insecure)


@dataclass(frozen=True)
class TaskRunner:
    """How one kind of task runs: in this process (``run``) or in a fresh one (``argv``, its command);
    ``preload`` imports what ``run`` needs, once, in the executor."""

    task_type: str  # flwr.supercore.constant.TaskType
    name: str  # for the logs: "region exec", "server exec"
    preload: Callable[[], None]
    run: Callable[[Task], None]
    argv: Callable[[Task], list[str]]


def fork_task(run: Callable[[], None], *, what: str) -> int:
    """A child of this (pre-imported) process that runs one task and exits with its code; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _as_a_fresh_process()
        run()
        code = 0
    except SystemExit as e:  # Flower ends its app processes through sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and ends; the executor goes on
        log.exception("%s failed", what)
    finally:
        logging.shutdown()
        os._exit(code)  # never return into the executor's loop


def _as_a_fresh_process() -> None:
    """Drop what the child inherited from the executor and a fresh process would not have: Flower's exit
    handlers (the task's own ``flwr_exit`` would run them, closing the executor's Runtime API client
    from here) and the executor's signal handlers (the task installs its own)."""
    from flwr.supercore.exit import exit_handler

    exit_handler.registered_exit_handlers.clear()
    for sig in exit_handler.SIGNAL_TO_EXIT_CODE:
        signal.signal(sig, signal.SIG_DFL)


def reap(children: set[int]) -> set[int]:
    """The children still running; finished ones are waited for (no zombies)."""
    running = set()
    for pid in children:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done == 0:
            running.add(pid)
    return running


def run_executor(
    runner: TaskRunner,
    *,
    runtime_api_address: str,
    insecure: bool,
    root_certificates: str | None,
    parent_pid: int | None,
    spawn: bool = False,
) -> None:
    """Ask the Runtime API for tasks of ``runner.task_type`` forever; run each in a fork (or a fresh process)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.telemetry import EventType
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # the component gone: nothing left to execute for
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    register_signal_handlers(
        event_type=EventType.RUN_SUPEREXEC_LEAVE, exit_message=f"fedcrm {runner.name} stopped.",
        exit_handlers=[client.close],
    )  # fmt: skip
    fork = not spawn and hasattr(os, "fork")
    if fork:
        runner.preload()
        preloaded = [m for m in BUNDLE_MODULES if m in sys.modules]
        if preloaded:  # a fork would run these instead of the bundle's own
            raise FederationError(f"{runner.name}: bundle modules {preloaded} were imported before any bundle")
    log.info("%s: taking %s tasks from %s (%s per task)", runner.name, runner.task_type, runtime_api_address,
             "fork" if fork else "new process")  # fmt: skip
    spawned: list[subprocess.Popen[bytes]] = []
    forked: set[int] = set()
    while True:
        spawned = [p for p in spawned if p.poll() is None]  # reap finished tasks (no zombies)
        forked = reap(forked)
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[runner.task_type]))
        if res.HasField("task") and res.token:
            task = Task(runtime_api_address=runtime_api_address, token=res.token, insecure=insecure,
                        root_certificates=root_certificates, parent_pid=os.getpid())  # fmt: skip
            if fork:
                forked.add(fork_task(functools.partial(runner.run, task), what=f"{runner.task_type} task"))
                continue  # another task may be waiting: ask again at once
            spawned.append(subprocess.Popen(runner.argv(task)))  # noqa: S603 - our own command, this host's Python
        time.sleep(POLL_S)
