"""The run's stale-shard marker (the server's side): ``RUN_DIR/erasure_pending.json``.

It learns only a shard index and a random request id per request, never anything derived from the
customer's id. ``fedcrm retrain RUN_DIR`` retrains the shards it names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedcrm.durable import write_json_atomically
from fedcrm.errors import StorageError

RUN_MARKER = "erasure_pending.json"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StorageError(f"{path}: damaged JSON ({e}); restore it from a backup") from None


def read_marker(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / RUN_MARKER
    if not p.exists():
        return {"stale": [], "attempt": None}
    data: dict[str, Any] = read_json(p)
    return data


def write_marker(run_dir: Path, marker: dict[str, Any]) -> None:
    write_json_atomically(Path(run_dir) / RUN_MARKER, marker, what="record the run's stale shards")


def mark_stale(run_dir: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Add ``{"region", "request_id", "shard"}`` entries to the run's marker (idempotent)."""
    marker = read_marker(run_dir)
    seen = {(e["region"], e["request_id"]) for e in marker["stale"]}
    for e in entries:
        if (e["region"], e["request_id"]) not in seen:
            marker["stale"].append({"region": e["region"], "request_id": e["request_id"], "shard": int(e["shard"])})
    write_marker(run_dir, marker)
