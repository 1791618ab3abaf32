"""Files of a constituent that must not survive it: overwrite their bytes, then release them.

On copy-on-write or journalling file systems and SSDs the old blocks may survive an overwrite; the
file is gone from the run folder either way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def destroy(path: Path) -> None:
    """Overwrite a file's bytes with zeros, then unlink it (best effort against recovery from disk).

    On copy-on-write or journalling file systems and SSDs the old blocks may survive an overwrite; the
    file is gone from the run folder either way.
    """
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def swap_in(src: Path, dst: Path) -> None:
    """Move ``src`` over ``dst`` atomically, then overwrite the old ``dst``'s bytes. Skips a moved ``src``."""
    if not src.exists():
        return
    if not dst.exists():
        os.replace(src, dst)
        return
    with open(dst, "r+b") as old:
        size = os.fstat(old.fileno()).st_size
        os.replace(src, dst)  # readers now see the new file; the old one lives on only through this handle
        old.write(b"\0" * size)
        old.flush()
        os.fsync(old.fileno())


def discard_staging(staging: Path) -> None:
    if not staging.exists():
        return
    for p in staging.rglob("*.npz"):
        destroy(p)
    shutil.rmtree(staging)


def destroy_constituent(run_dir: Path, shard: int) -> None:
    """Destroy constituent ``shard``'s weights and every checkpoint of its shard in the run folder."""
    destroy(Path(run_dir) / "model" / f"constituent-{shard}.npz")
    for old in sorted((Path(run_dir) / "checkpoints").glob(f"round-*-shard-{shard}.npz")):
        destroy(old)
