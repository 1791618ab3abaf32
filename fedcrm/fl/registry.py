"""Which node speaks for which region: recorded when a node is registered, never taken from its replies.

A reply's status record names a region, but that is the node's own claim: a node registered for
``eu`` could answer as ``us`` and have its update and metrics counted under another region's name.
The server therefore looks the sender's node id up here and rejects a reply whose claim differs.

Who records an entry:

- in deployment, the operator, when they register a data owner's public key with the SuperLink
  (``flwr supernode register`` prints the node id; ``fedcrm deploy register-node`` records it, and
  ``fedcrm deploy local`` does both); the ServerApp reads the folder named by the run config key
  ``node-registry``;
- in simulation, the harness that assigns each virtual node its region's node config
  (:func:`fedcrm.fl.simulation.simulated_node_config`), as it assigns it.

The registry is a folder with one small JSON file per node (``node-<id>.json``), each written whole
by an atomic rename, so writers on several processes never interleave and a reader never sees half
an entry. Beside them, one index file per region (``region-<sha256>.json``) names its node, so that
recording a node reads two files, not the whole folder: at 1,000 simulated regions, each recording
read every entry, a million reads before the first round (docs/benchmarks.md). A folder written before
the index existed (no ``indexed`` marker) is scanned whole, as then.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fedcrm.errors import ConfigError, StorageError

__all__ = ["NodeRegistry"]

_INDEXED = "indexed"  # marker: every entry in this folder has its region index


class NodeRegistry:
    """node id -> region, one file per node under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, node_id: int) -> Path:
        return self.directory / f"node-{int(node_id)}.json"

    def _index(self, region: str) -> Path:
        return self.directory / f"region-{hashlib.sha256(region.encode('utf-8')).hexdigest()[:32]}.json"

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".node-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _indexed(self) -> bool:
        """True when every entry of the folder has its region index (the folder was made with them)."""
        marker = self.directory / _INDEXED
        if marker.exists():
            return True
        if any(self.directory.glob("node-*.json")):
            return False  # entries from before the index: scan them
        marker.touch()
        return True

    def _nodes_of(self, region: str) -> dict[int, str]:
        """The recorded nodes that could be ``region``'s: from its index, or every entry of an old folder."""
        if not self._indexed():
            return self.regions()
        entry = self._read(self._index(region))
        return {} if entry is None else {int(entry["node_id"]): region}

    def record(self, *, node_id: int, region: str, public_key_sha256: str | None = None) -> None:
        """Record that ``node_id`` speaks for ``region``; a region's earlier node is dropped (a new key).

        One node per region: two nodes answering for one region would count its customers twice.
        Refuses (ConfigError) to move a node id that is already recorded for another region.
        """
        if not region or not isinstance(region, str):
            raise ConfigError(f"node registry {self.directory}: a region name is needed, got {region!r}")
        current = self.region_of(node_id)
        if current not in (None, region):
            raise ConfigError(
                f"node registry {self.directory}: node {node_id} is already registered for region "
                f"`{current}`, not `{region}`; a node speaks for one region only"
            )
        entry = {"node_id": int(node_id), "region": region, "public_key_sha256": public_key_sha256}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            earlier = self._nodes_of(region)
            self._write(self._path(node_id), entry)
            self._write(self._index(region), {"node_id": int(node_id), "region": region})
        except OSError as e:
            raise StorageError(f"node registry {self.directory}: cannot record node {node_id}: {e}") from e
        for other, name in earlier.items():
            if name == region and other != node_id:
                self._path(other).unlink(missing_ok=True)

    def region_of(self, node_id: int) -> str | None:
        """The region ``node_id`` was registered for, or None when it never was."""
        entry = self._read(self._path(node_id))
        return None if entry is None else str(entry["region"])

    def regions(self) -> dict[int, str]:
        """Every registered node id and its region."""
        out: dict[int, str] = {}
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("node-*.json")):
                entry = self._read(path)
                if entry is not None:
                    out[int(entry["node_id"])] = str(entry["region"])
        return out

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StorageError(f"{path}: unreadable node registry entry: {e}") from e
        if not isinstance(entry, dict) or not {"node_id", "region"} <= set(entry):
            raise StorageError(f"{path}: a node registry entry needs `node_id` and `region`, found {entry!r}")
        return entry
