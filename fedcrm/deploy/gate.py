"""The region's gate in front of every ClientApp: ``fedcrm region exec`` and its gated ClientApp process.

Where the gate sits, and why there (Flower 1.42): a SuperNode started with ``--isolation process``
starts no ClientApp itself; a separate SuperExec, run by the region, asks the SuperNode's Runtime API
for tasks and starts one ``flwr-clientapp`` process per message. That process pulls the message and
the app bundle (FAB) from the SuperNode, unpacks the bundle, puts its folder first on ``sys.path`` and
imports the ClientApp. ``fedcrm region exec`` is that SuperExec, with one change: it starts the gated
process of this module instead of ``flwr-clientapp``. The gated process is ``flwr-clientapp``'s own
code with a check between pulling the bundle and unpacking it (:func:`fedcrm.deploy.approval.check_bundle`):
an unapproved, changed or safeguard-carrying bundle is refused with an error reply to the server,
before any of its files are written or imported. An approved one is then made to hold exactly its
approved bytes in Flower's install folder, which Flower would otherwise reuse as it found it
(:mod:`fedcrm.deploy.installed_bundle`).

Flower's ``--trusted-entities`` cannot do this job in 1.42: it accepts only bundles that arrive with
Flower Hub verification records, so it refuses every bundle submitted with ``flwr run .``.

Warm: a fresh interpreter per message spent seconds importing torch, Opacus, Flower and fedcrm before
a round that trains for 0.02 s (docs/benchmarks.md §5). The executor (:mod:`fedcrm.deploy.executor`)
imports them once, at start, and forks itself per message (POSIX): the child is a gated ClientApp
process as before, the check still before the bundle is unpacked, and nothing of the child's (its bundle
on ``sys.path``, the gate's patch of Flower's pull) reaches the executor or the next message.
``--spawn`` keeps a fresh interpreter per message.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcrm.deploy.approval import SIGNATURE_KEY, Approval, RegionTrust, check_bundle, load_trust
from fedcrm.deploy.executor import Task, TaskRunner, run_executor
from fedcrm.deploy.installed_bundle import install_approved
from fedcrm.errors import BundleRefused, FedcrmError

__all__ = ["gated_clientapp_command", "run_gated_clientapp", "run_region_exec"]

log = logging.getLogger("fedcrm.region")


def gated_clientapp_command(task: Task, *, trust: Path) -> list[str]:
    """The argv that starts one gated ClientApp process (this module, with this host's Python)."""
    return [sys.executable, "-m", "fedcrm.deploy.gate", *task.argv(), "--trust", str(trust)]


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
            # Flower reuses an existing install folder of the same name, version and 8 hash digits without
            # extracting: make it hold exactly the approved bytes before Flower's install and load see it.
            install_approved(
                content=fab.content, fab_id=approval.fab_id, version=approval.version, digest=approval.digest
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


def run_gated_clientapp(task: Task, *, trust_path: Path) -> None:
    """Run one message through ``flwr-clientapp``'s code, the bundle checked between pull and unpack."""
    import flwr
    from flwr.supernode.runtime import run_clientapp as rc

    # The trust file is read before anything is pulled: a broken one refuses everything.
    trust = load_trust(trust_path)
    # Fail closed if Flower's ClientApp process changed shape: the check relies on run_clientapp pulling
    # the task input through this module-level function before it installs the bundle (flwr 1.42).
    if not flwr.__version__.startswith("1.42.") or not callable(getattr(rc, "pull_task_input", None)):
        raise FedcrmError(f"the region gate supports flwr 1.42 only, found flwr {flwr.__version__}")
    # This process exists for this one message: replacing the function here changes nothing elsewhere.
    rc.pull_task_input = _gate(rc.pull_task_input, trust=trust)  # type: ignore[assignment]
    # No __pycache__ in the install folder: it would differ from the approved bytes (and a stale .pyc is
    # what Python runs in place of its source), so the next message would have to extract it again.
    sys.dont_write_bytecode = True
    rc.run_clientapp(
        runtime_api_address=task.runtime_api_address,
        token=task.token,
        insecure=task.insecure,
        certificates=task.certificates(),
        parent_pid=task.parent_pid,
        runtime_dependency_install=False,  # a region installs nothing a bundle asks for
    )


# --- the region's SuperExec -----------------------------------------------------------------------


def _preload() -> None:
    """Import, once, what every gated ClientApp process needs: its children start with it imported."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import opacus  # noqa: F401

    import fedcrm.fl.client  # noqa: F401 - torch, numpy, pandas, fedcrm's region code
    import fedcrm.training  # noqa: F401


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

    Flower's own SuperExec loop (:func:`fedcrm.deploy.executor.run_executor`) with two differences: only
    ClientApp tasks are taken (a region runs no ServerApp), and each is started through the gate. Each
    is a fork of this process, which imported the ClientApp's libraries at start, or with ``spawn`` (or
    where there is no fork) a fresh interpreter.
    """
    from flwr.supercore.constant import TaskType

    load_trust(trust_path)  # a broken trust file stops the region's executor at start, with its error
    trust_path = Path(trust_path).resolve()
    runner = TaskRunner(
        task_type=TaskType.CLIENT_APP,
        name="region exec",
        preload=_preload,
        run=functools.partial(run_gated_clientapp, trust_path=trust_path),
        argv=functools.partial(gated_clientapp_command, trust=trust_path),
    )
    log.info("region exec: bundles checked against %s", trust_path)
    run_executor(runner, runtime_api_address=runtime_api_address, insecure=insecure,
                 root_certificates=root_certificates, parent_pid=parent_pid, spawn=spawn)  # fmt: skip


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
    task = Task(runtime_api_address=a.runtime_api_address, token=a.token, insecure=a.insecure,
                root_certificates=a.root_certificates, parent_pid=a.parent_pid)  # fmt: skip
    run_gated_clientapp(task, trust_path=a.trust)


if __name__ == "__main__":
    main()
