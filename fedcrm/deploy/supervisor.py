"""A supervisor of process *groups*: start a command in its own session, stop it and everything it started.

Why process groups: each Flower component starts children of its own (a ``flower-superexec``, which
starts one ``flwr-serverapp`` / ``flwr-clientapp`` process per run or message), and the SuperLink starts
its SuperExec in a new session. Every component is therefore started in its own session, the process
groups of all its descendants are collected before it is stopped, and stopping checks that no process
of any of those groups is left. Nothing here knows about Flower: :mod:`fedcrm.deploy.topology` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Component",
    "Recorded",
    "Report",
    "free_port",
    "processes_with_env",
    "pump",
    "start_component",
    "start_ticks",
    "stop_groups",
    "terminate_as_interrupt",
]

Report = Callable[[str], None]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc (Linux)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
        if len(rest) >= 3:
            table[int(entry.name)] = (int(rest[1]), int(rest[2]), rest[0])
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def group_members(groups: set[int]) -> list[int]:
    """Live (non-zombie) processes of these process groups."""
    return [p for p, (_, pgrp, state) in _proc_table().items() if pgrp in groups and state != "Z"]


def stop_groups(
    groups: set[int],
    *,
    alive: Callable[[], bool],
    reap: Callable[[float], None] | None = None,
    grace_s: float = 10.0,
    hard_s: float = 15.0,
) -> list[str]:
    """SIGTERM every group, SIGKILL what is left after ``grace_s``; return what still lives (nothing).

    ``alive`` says whether the group's leader still runs; ``reap`` waits for it when it is our child.
    """

    def signal_all(sig: int) -> None:
        for g in sorted(groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)

    signal_all(signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and (alive() or group_members(groups)):
        time.sleep(0.2)
    if alive() or group_members(groups):
        signal_all(signal.SIGKILL)
    if reap is not None:
        reap(hard_s)
    deadline = time.time() + hard_s
    while time.time() < deadline and (alive() or group_members(groups)):
        time.sleep(0.2)
    return [f"{p} {_cmdline(p)}" for p in group_members(groups)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@dataclass
class Component:
    """One process we started (in its own session) and every process group its descendants use."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    groups: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh_groups(self) -> None:
        """Remember the process groups of all descendants (the SuperLink's SuperExec has its own session)."""
        table = _proc_table()
        self.groups.add(self.pid)
        for p in _descendants(self.pid, table):
            self.groups.add(table[p][1])

    def members(self) -> list[int]:
        """Live (non-zombie) processes of this component's groups."""
        return group_members(self.groups)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal_all(self, sig: int) -> None:
        for g in sorted(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)

    def record(self) -> Recorded:
        """What a later command needs to find this process again, and to tell it from a reused pid."""
        return Recorded.of_pid(self.pid, name=self.name, log_path=self.log_path)

    def stop(self, *, grace_s: float = 10.0, hard_s: float = 15.0) -> list[str]:
        """SIGTERM every group, SIGKILL what is left after ``grace_s``; return what still lives (nothing)."""
        if self.alive():
            self.refresh_groups()
        self.groups.add(self.pid)

        def reap(timeout: float) -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)

        return stop_groups(self.groups, alive=self.alive, reap=reap, grace_s=grace_s, hard_s=hard_s)

    def kill(self) -> None:
        """SIGKILL the whole component at once, as a crash or a pulled plug would (tests)."""
        if self.alive():
            self.refresh_groups()
        self.groups.add(self.pid)
        self.signal_all(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22); None if it is gone or a zombie.

    Pids are reused: a pid with another start time is another process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    if len(rest) < 20 or rest[0] == "Z":
        return None
    return int(rest[19])


def environ_has(pid: int, key: str, *, under: Path) -> bool:
    """Whether process ``pid`` has ``key`` set to ``under`` or a path below it (False if unreadable)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    prefix = f"{key}=".encode()
    root = str(Path(under).resolve())
    for item in env:
        if item.startswith(prefix):
            value = item[len(prefix) :].decode(errors="replace")
            return value == root or value.startswith(root + os.sep)
    return False


def processes_with_env(key: str, *, under: Path) -> list[int]:
    """Live processes whose ``key`` environment variable lies under ``under`` (ours: other users' are unreadable)."""
    return [p for p, (_, _, state) in _proc_table().items() if state != "Z" and environ_has(p, key, under=under)]


@dataclass(frozen=True)
class Recorded:
    """A process an earlier command started and left running, known by pid, start time and command line.

    ``running`` holds only while the pid still runs the very process recorded: same start time, same
    command line (a pid reused by anything else fails both), so nothing else is ever signalled.
    """

    name: str
    pid: int
    started: int
    cmdline: str
    log_path: Path

    @classmethod
    def of_pid(cls, pid: int, *, name: str, log_path: Path) -> Recorded:
        """Record the process that runs as ``pid`` now (started 0, never running, if it is gone)."""
        return cls(name=name, pid=pid, started=start_ticks(pid) or 0, cmdline=_cmdline(pid), log_path=log_path)

    def running(self) -> bool:
        return self.started != 0 and start_ticks(self.pid) == self.started and _cmdline(self.pid) == self.cmdline

    def stop(self, *, grace_s: float = 10.0, hard_s: float = 15.0) -> list[str]:
        """Stop the process and every process group of its descendants (nothing if it no longer runs)."""
        if not self.running():
            return []
        table = _proc_table()
        groups = {self.pid} | {table[p][1] for p in _descendants(self.pid, table)}
        return stop_groups(groups, alive=self.running, grace_s=grace_s, hard_s=hard_s)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pid": self.pid,
            "started": self.started,
            "cmdline": self.cmdline,
            "log": str(self.log_path),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recorded:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            started=int(data["started"]),
            cmdline=str(data["cmdline"]),
            log_path=Path(str(data["log"])),
        )


def start_component(
    name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, stdout_pipe: bool = False
) -> Component:
    """Start ``argv`` in a new session, its output appended to ``log_path`` (or piped, for :func:`pump`)."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
    try:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, never by a stray Ctrl-C
        )
    finally:
        log_file.close()
    return Component(name=name, popen=popen, log_path=log_path, groups={popen.pid})


def pump(comp: Component, on_line: Report | None) -> None:
    """Copy a component's stdout to its log file and to ``on_line``, line by line."""
    assert comp.popen.stdout is not None
    with open(comp.log_path, "a", encoding="utf-8") as log:
        for raw in comp.popen.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log.write(line + "\n")
            log.flush()
            if on_line is not None:
                on_line(line)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does, so every started process is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
