"""Where the audit logs live, who an entry says acted, and the entries the server and regions write.

Every region keeps ``<state>/<region>/audit.log`` next to its ledger; the server keeps
``RUN_DIR/audit.log`` for every run (and retrain) written into that run folder. The log format and its
checks are :mod:`fedcrm.governance.audit_log`; this module only decides what goes in.

Actors: a command run by a person names them (``--operator NAME``, else ``$USER``); things a node does
on its own name the node (``region:<name>``, ``server``). Customer ids appear only in a region's log, as
keyed hashes under the region's secret.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

from fedcrm.governance.audit_log import AUDIT_FILE, AuditAction, AuditLog
from fedcrm.governance.customer_refs import RegionAuditLog
from fedcrm.governance.policy import RegionPolicy
from fedcrm.run_summary import RunSummary

SERVER_ACTOR = "server"

P = ParamSpec("P")


def region_audit_log(state_dir: Path) -> RegionAuditLog:
    """The region's own audit log, in its state folder (created on first use); customers in it are keyed
    hashes under the region's secret (:mod:`fedcrm.governance.customer_refs`)."""
    return RegionAuditLog.in_state(Path(state_dir))


def server_audit_log(run_dir: Path) -> AuditLog:
    """The server's audit log of a run folder: every run and retrain written into it. It never names a
    customer, so it has no customer key (the server holds no region's secret)."""
    return AuditLog.open(Path(run_dir) / AUDIT_FILE)


def node_actor(region: str) -> str:
    return f"region:{region}"


def operator_actor(name: str | None = None) -> str:
    """The person behind a command: the name given, else the login name, else ``unknown``."""
    if name and name.strip():
        return name.strip()
    try:
        return os.environ.get("USER") or getpass.getuser() or "unknown"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def policy_fingerprint(policy: RegionPolicy, path: Path | None) -> dict[str, Any]:
    """What identifies the policy in force: its file's sha256 and the sha256 of what it resolves to.

    The resolved digest also changes when no file is given and only the default budget moved.
    """
    effective = hashlib.sha256(json.dumps(policy.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return {
        "policy_file": str(path) if path else None,
        "file_sha256": sha256_file(path) if path else None,
        "effective_sha256": effective,
    }


def _last_details(log: AuditLog, action: AuditAction) -> dict[str, Any] | None:
    """Details of the last intact entry with ``action`` (the chain itself is `audit verify`'s job)."""
    try:
        lines = log.path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("action") == action.value and isinstance(obj.get("details"), dict):
            return dict(obj["details"])
    return None


def record_policy_if_changed(log: AuditLog, *, region: str, policy: RegionPolicy, path: Path | None) -> bool:
    """Append ``policy_changed`` when the policy in force differs from the last one recorded."""
    now = policy_fingerprint(policy, path)
    last = _last_details(log, AuditAction.POLICY_CHANGED)
    keys = ("file_sha256", "effective_sha256")
    if last is not None and all(last.get(k) == now[k] for k in keys):
        return False
    details = {**now, "privacy_budget": policy.privacy_budget, "min_customers": policy.min_customers}
    if last is not None:
        details["previous_effective_sha256"] = last.get("effective_sha256")
    log.append(actor=node_actor(region), action=AuditAction.POLICY_CHANGED, details=details)
    return True


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None: audit entries are canonical JSON, which has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def audited_run(fn: Callable[P, RunSummary]) -> Callable[P, RunSummary]:
    """Wrap the server's ``run_federation``: ``run_started`` before, ``run_finished``/``run_failed`` after.

    Reads ``cfg`` and ``run_dir`` from the call; the entries carry the config's sha256, so a run can be
    tied to the exact configuration it trained with.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> RunSummary:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg = bound.arguments["cfg"]
        log = server_audit_log(Path(bound.arguments["run_dir"]))
        started = {
            "name": cfg.name,
            "task": cfg.task,
            "config_sha256": cfg.digest(),
            "regions": sorted(cfg.regions),
            "privacy_mode": cfg.privacy.mode,
            "target_epsilon": cfg.privacy.target_epsilon,
            "rounds": cfg.training.rounds,
            "shards": cfg.unlearning.shards,
            "constituents": bound.arguments.get("shards"),
            "model_version": bound.arguments.get("model_version"),
        }
        log.append(actor=SERVER_ACTOR, action=AuditAction.RUN_STARTED, details=finite(started))
        try:
            summary = fn(*args, **kwargs)
        except BaseException as e:
            log.append(
                actor=SERVER_ACTOR,
                action=AuditAction.RUN_FAILED,
                details={
                    "name": cfg.name,
                    "config_sha256": started["config_sha256"],
                    "error": type(e).__name__,
                    "message": str(e)[:500],
                },
            )
            raise
        events = summary.event_reasons()
        log.append(
            actor=SERVER_ACTOR,
            action=AuditAction.RUN_FINISHED,
            details=finite(
                {
                    "name": cfg.name,
                    "run_id": summary.run_id,
                    "config_sha256": summary.config_sha256,
                    "model_version": summary.model_version,
                    "final_auc": summary.final_metrics.get("auc"),
                    "epsilon_by_region": {r: p.get("epsilon") for r, p in summary.privacy.items()},
                    "refused": events["refused"],
                    "failed": events["failed"],
                    "rejected": events["rejected"],
                }
            ),
        )
        return summary

    return wrapper
