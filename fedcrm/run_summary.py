"""``RUN_DIR/summary.json``: what a finished run (federated, centralised baseline, retrain) reports.

:class:`RunSummary` is the only code that writes or reads the file. The JSON keeps the shape fedcrm has
always written (reports, sweeps, MLflow and old run folders read it), so a field absent from a summary
(an older fedcrm, or the centralised baseline) is ``None`` here and stays absent on disk, and keys this
fedcrm does not know are kept in ``extra`` and written back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedcrm.errors import StorageError

SUMMARY_FILE = "summary.json"
CENTRALISED = "centralised"

# The order of the keys in the file, as fedcrm has written them: a federated run's summary and the
# centralised baseline's interleave (``kind`` and ``training`` are the baseline's only).
KEY_ORDER = (
    "name",
    "kind",
    "run_id",
    "task",
    "privacy_mode",
    "final_metrics",
    "final_metrics_by_region",
    "suppressed_regions",
    "privacy",
    "regions",
    "training",
    "events",
    "warnings",
    "shards",
    "model_version",
    "rounds_completed",
    "config_sha256",
    "code_version",
    "started",
    "wall_time_s",
    "audit_head",
    "fairness",
    "feature_importance",
    "retrained_shards",
)
# What every summary fedcrm ever wrote has: without these a file is not a run summary.
REQUIRED = (
    "name",
    "task",
    "privacy_mode",
    "final_metrics",
    "privacy",
    "regions",
    "warnings",
    "config_sha256",
    "code_version",
    "wall_time_s",
)
EVENT_KINDS = ("refused", "failed", "rejected")


@dataclass(frozen=True)
class RunSummary:
    """One run's summary; ``None`` marks a key the file does not have."""

    name: str
    task: str
    privacy_mode: str
    final_metrics: dict[str, float]
    # region -> epsilon, delta, budget, accountant, target_epsilon, refused, releases_this_run
    privacy: dict[str, dict[str, Any]]
    # region -> public figures as the region's policy declares them (the baseline: exact counts)
    regions: dict[str, dict[str, Any]]
    warnings: list[str]
    config_sha256: str
    code_version: str
    wall_time_s: float
    kind: str | None = None  # "centralised" for the baseline; absent for a federated run
    run_id: str | None = None
    final_metrics_by_region: dict[str, dict[str, float]] | None = None
    suppressed_regions: dict[str, str] | None = None  # regions left out of the pooled metrics, and why
    training: dict[str, Any] | None = None  # the baseline's epochs, examples, steps
    events: dict[str, dict[str, str]] | None = None  # refused / failed / rejected: who -> why
    shards: int | None = None
    model_version: int | None = None
    rounds_completed: int | None = None
    started: float | None = None  # Unix seconds; absent in summaries written before fedcrm recorded it
    audit_head: str | None = None  # the server's audit log head when the run finished
    fairness: dict[str, Any] | None = None
    feature_importance: dict[str, Any] | None = None
    retrained_shards: list[int] | None = None  # set when an erasure retrain committed this summary
    extra: dict[str, Any] = field(default_factory=dict)  # keys this fedcrm does not know, kept as found

    # -- disk ------------------------------------------------------------------------------------------

    @staticmethod
    def path_in(run_dir: Path) -> Path:
        return Path(run_dir) / SUMMARY_FILE

    @classmethod
    def exists_in(cls, run_dir: Path) -> bool:
        return cls.path_in(run_dir).is_file()

    @classmethod
    def read(cls, run_dir: Path) -> RunSummary:
        path = cls.path_in(run_dir)
        if not path.exists():
            raise StorageError(f"{run_dir}: no {SUMMARY_FILE} (the run did not finish, or this is not a run folder)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StorageError(f"{path}: damaged run summary ({e}); run it again or restore the file") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str) -> RunSummary:
        if not isinstance(raw, dict):
            raise StorageError(f"{source}: a run summary must be a JSON object, got {type(raw).__name__}")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise StorageError(f"{source}: not a run summary, missing key(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known}
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order fedcrm writes them; absent (``None``) keys left out."""
        out = {k: getattr(self, k) for k in KEY_ORDER if getattr(self, k) is not None}
        return out | {k: v for k, v in self.extra.items() if k not in out}

    def to_json(self) -> str:
        """The file's text (written by :meth:`fedcrm.runs.RunDir.write_summary`)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    # -- what readers ask ------------------------------------------------------------------------------

    @property
    def is_centralised(self) -> bool:
        return self.kind == CENTRALISED

    def with_retrained(self, shards: list[int]) -> RunSummary:
        return replace(self, retrained_shards=list(shards))

    def epsilon_by_region(self) -> dict[str, float]:
        """ε per region where the summary has one (none for the baseline or a region that refused)."""
        return {r: float(p["epsilon"]) for r, p in self.privacy.items() if p.get("epsilon") is not None}

    def delta(self) -> float | None:
        """The run's δ: the first region's recorded δ (every region's policy sets its own; they agree)."""
        return next((float(p["delta"]) for p in self.privacy.values() if p.get("delta")), None)

    def event_reasons(self) -> dict[str, dict[str, str]]:
        """Refused / failed / rejected: who -> why, each kind present (empty when the run had none)."""
        events = self.events or {}
        return {kind: dict(events.get(kind, {})) for kind in EVENT_KINDS}

    def problems(self) -> dict[str, str]:
        """Every region or node that did not take part in full, and why (events and refusals together)."""
        out = {who: why for reasons in self.event_reasons().values() for who, why in reasons.items()}
        return out | {r: str(p["refused"]) for r, p in self.privacy.items() if p.get("refused")}
