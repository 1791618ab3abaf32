"""Keeping what a region derives from its table between messages, keyed by the files' versions."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar, cast

T = TypeVar("T")


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, modification time, size) of a file, or None if it does not exist.

    Changes when the file is written in place or replaced (a re-import, rsync and most copy tools write
    a new file, hence a new inode, even when they keep the modification time).
    """
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RowBoundedCache:
    """What a region derives from its table, kept between messages by one client process.

    A region's table is read, validated and encoded once, not at every message: values are kept with
    :meth:`remember` under a key that names every file they were derived from (by inode, modification time
    and size) and every setting that shaped them, so an edited table, a new tombstone or a consent
    withdrawal builds them again (see ``Region.load``).

    Bounded by rows, not by entries: in simulation one process serves many small regions in turn, and
    a cache of a few tables would miss on every message. The least recently used go first; the one just
    added always stays, however large.
    """

    def __init__(self, *, max_rows: int = 2_000_000) -> None:
        self.max_rows = max_rows
        self._entries: dict[Hashable, tuple[Any, int]] = {}

    def remember(self, key: Hashable, build: Callable[[], T], *, rows: Callable[[T], int]) -> T:
        """The value cached under ``key``, or ``build()``'s, cached as ``rows(value)`` rows."""
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recently used goes last, evicted last
            return cast(T, self._entries[key][0])
        value = build()
        self._entries[key] = (value, rows(value))
        while len(self._entries) > 1 and sum(n for _, n in self._entries.values()) > self.max_rows:
            self._entries.pop(next(iter(self._entries)))
        return value
