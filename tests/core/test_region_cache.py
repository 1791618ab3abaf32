"""A client process keeps each region's encoded customers between messages, and never serves stale ones:
a tombstone, a consent withdrawal or an edited table is seen by the next message."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import write_tiny_config

from fedcrm.config import load_config
from fedcrm.data.io import RowBoundedCache
from fedcrm.data.schema import load_schema
from fedcrm.governance.consent import ConsentWithdrawals
from fedcrm.region import NodeSettings, Region
from fedcrm.unlearning.shards import region_secret_path
from fedcrm.unlearning.tombstones import Tombstones


def test_region_data_is_reused_until_any_input_changes(tmp_path: Path) -> None:
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": 300}))
    schema = load_schema(cfg.schema_path)
    settings = NodeSettings(
        region="eu", data_path=cfg.regions["eu"], state_dir=tmp_path / "state" / "eu", schema_path=cfg.schema_path
    )
    cache = RowBoundedCache()

    def load():  # a fresh Region per message, as the ClientApp does, sharing the process's cache
        return Region(settings, cache=cache).load(cfg, schema)

    first = load()
    assert load() is first  # nothing changed: served from the cache
    # The config's seed does not pick the hold-out (the region's secret does): the same data, from the cache.
    assert Region(settings, cache=cache).load(cfg.with_overrides({"seed": 1}), schema) is first
    # A new secret (the data owner restored another key file): another hold-out, not the cached one.
    key_file = region_secret_path(settings.state_dir)
    key_file.with_name("restored.key").write_text("f" * 64)
    key_file.with_name("restored.key").chmod(0o600)  # a secret readable by others is refused
    os.replace(key_file.with_name("restored.key"), key_file)
    other = load()
    assert other is not first and not (other.holdout == first.holdout).all()
    first = other

    a, b = (str(i) for i in first.ids[:2])
    Tombstones(settings.state_dir).add([a])
    after_forget = load()
    assert a not in set(after_forget.ids) and len(after_forget.ids) == len(first.ids) - 1

    ConsentWithdrawals(settings.state_dir).add(b, purpose=cfg.task)
    after_withdrawal = load()
    assert b not in set(after_withdrawal.ids) and len(after_withdrawal.ids) == len(first.ids) - 2

    path = Path(cfg.regions["eu"])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-10]))  # the data owner re-imports a shorter table
    reimported = load()
    assert reimported.counts["customers_in_table"] == first.counts["customers_in_table"] - 10

    # A copy tool that keeps size and modification time still writes a new file (new inode): seen.
    old_stat = path.stat()
    text = path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    flipped = last[:-1] + ("1" if last[-1] == "0" else "0")  # the last column is the label
    replacement = path.with_name("incoming.csv")
    replacement.write_text(text[: text.rindex(last)] + flipped + "\n")
    os.utime(replacement, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_size == old_stat.st_size and path.stat().st_mtime_ns == old_stat.st_mtime_ns
    relabelled = load()
    assert relabelled is not reimported
    assert int(relabelled.y.sum()) != int(reimported.y.sum()) or len(relabelled.ids) != len(reimported.ids)
