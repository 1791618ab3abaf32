"""The region's gate in front of every ClientApp: ``fedcrm region exec`` and its gated ClientApp process.

Where the gate sits, and why there (Flower 1.42): a SuperNode started with ``--isolation process``
starts no ClientApp itself; a separate SuperExec, run by the region, asks the SuperNode's Runtime API
for tasks and starts one ``flwr-clientapp`` process per message. That process pulls the message and
the app bundle (FAB) from the SuperNode, unpacks the bundle, puts its folder first on ``sys.path`` and
imports the ClientApp. ``fedcrm region exec`` is that SuperExec, with one change: it starts the gated
process of this module instead of ``flwr-clientapp``. The gated process is ``flwr-clientapp``'s own
code with a check between pulling the bundle and unpacking it (:func:`fedcrm.deploy.approval.check_bundle`):
an unapproved, changed or safeguard-carrying bundle is refused with an error reply to the server,
before any of its files are written or imported.

Flower's ``--trusted-entities`` cannot do this job in 1.42: it accepts only bundles that arrive with
Flower Hub verification records, so it refuses every bundle submitted with ``flwr run .``.

Warm: a fresh interpreter per message spent seconds importing torch, Opacus, Flower and fedcrm before
a round that trains for 0.02 s (docs/benchmarks.md §5). The executor imports them once, at start, and
forks itself per message (POSIX): the child is a gated ClientApp process as before, the check still
before the bundle is unpacked, and nothing of the child's (its bundle on ``sys.path``, the gate's
patch of Flower's pull) reaches the executor or the next message. ``--spawn`` keeps the old way.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcrm.deploy.approval import SIGNATURE_KEY, Approval, RegionTrust, check_bundle, load_trust
from fedcrm.errors import BundleRefused, FedcrmError

__all__ = ["gated_clientapp_command", "run_gated_clientapp", "run_region_exec"]

log = logging.getLogger("fedcrm.region")
# How often the executor asks its SuperNode for a task when none was waiting: a local HTTP call, cheap,
# while each second here was a second of every message's latency (Flower's own SuperExec: 1 s).
_POLL_S = 0.2


def gated_clientapp_command(
    *,
    runtime_api_address: str,
    token: str,
    trust: Path,
    insecure: bool,
    root_certificates: str | None,
    parent_pid: int | None,
) -> list[str]:
    """The argv that starts one gated ClientApp process (this module, with this host's Python)."""
    argv = [sys.executable, "-m", "fedcrm.deploy.gate", "--runtime-api-address", runtime_api_address,
            "--token", token, "--trust", str(trust)]  # fmt: skip
    if insecure:
        argv.append("--insecure")
    elif root_certificates is not None:
        argv += ["--root-certificates", root_certificates]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv


# --- the gated ClientApp process ------------------------------------------------------------------


def _gate(pull: Callable[[Any], tuple[Any, Any, Any, Any]], *, trust: RegionTrust) -> Callable[..., Any]:
    """Wrap flwr-clientapp's ``pull_task_input``: check the bundle it returns before anything uses it."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode
    from flwr.supernode.runtime import run_clientapp as rc

    def gated(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        try:
            approval: Approval = check_bundle(
                content=fab.content, signature=str(run.override_config.get(SIGNATURE_KEY, "")), trust=trust
            )
            # The bundle is unpacked and loaded under the names the run gives: they must be this bundle's.
            if (fab.hash_str, run.fab_hash, run.fab_id, run.fab_version) != (
                approval.digest,
                approval.digest,
                approval.fab_id,
                approval.version,
            ):
                raise BundleRefused(
                    f"bundle not approved by the region's data owner: the run names bundle {run.fab_id} "
                    f"{run.fab_version} {run.fab_hash}, the bytes are {approval.fab_id} {approval.version} "
                    f"{approval.digest}"
                )
        except BundleRefused as e:
            log.error("region refused run %s's app bundle: %s", run.run_id, e)
            reason = f"region refused the app bundle: {str(e).split(':', 1)[0]}"  # the fixed part only
            rc.push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                            reply_to=message), context)  # fmt: skip
            raise
        log.info("run %s: app bundle %s approved (%s)", run.run_id, approval.digest, approval.approver)
        return message, context, run, fab

    return gated


def run_gated_clientapp(
    *,
    runtime_api_address: str,
    token: str,
    trust_path: Path,
    insecure: bool,
    root_certificates: str | None,
    parent_pid: int | None,
) -> None:
    """Run one message through ``flwr-clientapp``'s code, the bundle checked between pull and unpack."""
    import flwr
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as rc

    # The trust file is read before anything is pulled: a broken one refuses everything.
    trust = load_trust(trust_path)
    # Fail closed if Flower's ClientApp process changed shape: the check relies on run_clientapp pulling
    # the task input through this module-level function before it installs the bundle (flwr 1.42).
    if not flwr.__version__.startswith("1.42.") or not callable(getattr(rc, "pull_task_input", None)):
        raise FedcrmError(f"the region gate supports flwr 1.42 only, found flwr {flwr.__version__}")
    # This process exists for this one message: replacing the function here changes nothing elsewhere.
    rc.pull_task_input = _gate(rc.pull_task_input, trust=trust)  # type: ignore[assignment]
    rc.run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,  # a region installs nothing a bundle asks for
    )


# --- the region's SuperExec -----------------------------------------------------------------------


def _preload() -> None:
    """Import, once, what every gated ClientApp process needs: its children start with it imported."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import opacus  # noqa: F401

    import fedcrm.fl.client  # noqa: F401 - torch, numpy, pandas, fedcrm's region code
    import fedcrm.training  # noqa: F401


def _fork_gated_clientapp(**kwargs: Any) -> int:
    """A child of this (pre-imported) executor that runs one message through the gate; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        run_gated_clientapp(**kwargs)
        code = 0
    except SystemExit as e:  # Flower ends a ClientApp process through sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and ends; the executor goes on
        log.exception("gated ClientApp process failed")
    finally:
        logging.shutdown()
        os._exit(code)  # never return into the executor's loop


def _reap(children: set[int]) -> set[int]:
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


def run_region_exec(
    *,
    runtime_api_address: str,
    trust_path: Path,
    insecure: bool,
    root_certificates: str | None = None,
    parent_pid: int | None = None,
    spawn: bool = False,
) -> None:
    """Ask the SuperNode for ClientApp tasks forever; start each as a gated ClientApp process.

    Flower's own SuperExec loop (``flwr.supercore.superexec.run_superexec``) with two differences: only
    ClientApp tasks are taken (a region runs no ServerApp), and each is started through the gate. Each
    is a fork of this process, which imported the ClientApp's libraries at start, or with ``spawn`` (or
    where there is no fork) a fresh interpreter.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.telemetry import EventType
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    load_trust(trust_path)  # a broken trust file stops the region's executor at start, with its error
    trust_path = Path(trust_path).resolve()
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # the SuperNode gone: nothing left to execute for
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    register_signal_handlers(
        event_type=EventType.RUN_SUPEREXEC_LEAVE, exit_message="fedcrm region exec stopped.",
        exit_handlers=[client.close],
    )  # fmt: skip
    fork = not spawn and hasattr(os, "fork")
    if fork:
        _preload()
    log.info("region exec: taking ClientApp tasks from %s, bundles checked against %s (%s per message)",
             runtime_api_address, trust_path, "fork" if fork else "new process")  # fmt: skip
    spawned: list[subprocess.Popen[bytes]] = []
    forked: set[int] = set()
    while True:
        spawned = [p for p in spawned if p.poll() is None]  # reap finished ClientApps (no zombies)
        forked = _reap(forked)
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            if fork:
                forked.add(_fork_gated_clientapp(
                    runtime_api_address=runtime_api_address, token=res.token, trust_path=trust_path,
                    insecure=insecure, root_certificates=root_certificates, parent_pid=os.getpid(),
                ))  # fmt: skip
                continue  # another task may be waiting: ask again at once
            argv = gated_clientapp_command(
                runtime_api_address=runtime_api_address, token=res.token, trust=trust_path, insecure=insecure,
                root_certificates=root_certificates, parent_pid=os.getpid(),
            )  # fmt: skip
            spawned.append(subprocess.Popen(argv))  # noqa: S603 - our own module, with this host's Python
        time.sleep(_POLL_S)


def _args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedcrm.deploy.gate", description="One gated ClientApp process.")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--trust", required=True, type=Path)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    return p


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = _args().parse_args()
    run_gated_clientapp(
        runtime_api_address=a.runtime_api_address, token=a.token, trust_path=a.trust, insecure=a.insecure,
        root_certificates=a.root_certificates, parent_pid=a.parent_pid,
    )  # fmt: skip


if __name__ == "__main__":
    main()
