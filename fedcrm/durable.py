"""Writing files so that a crash or a full disk never leaves half a record behind.

Two shapes cover every file fedcrm writes: whole files replaced atomically (config, summary, weights:
write a temporary file, fsync, rename) and append-only logs (metrics, audit log: append, fsync, and on
failure cut the file back to its length before the write). Either way, what was recorded before a
failed write is intact, and the error says which file, why, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fedcrm.errors import StorageError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_error(path: Path, what: str, exc: OSError, *, then: str = "") -> StorageError:
    """A StorageError naming the file, the cause in plain words, and what to do next."""
    if exc.errno in _NO_SPACE:
        cause = "the disk is full (or the file size limit is reached)"
        advice = "free space on that disk" + (f", then {then}" if then else ", then retry")
    else:
        cause = exc.strerror or str(exc)
        advice = then or "check the path and its permissions, then retry"
    return StorageError(f"{path}: cannot {what}: {cause}. Nothing recorded before was lost; {advice}.")


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], object], *, what: str, then: str = "", mode: int = 0o666
) -> None:
    """Replace ``path`` with what ``write`` puts in a file: all of it, or (on failure) none of it.

    ``mode`` is the new file's permissions (less the umask): 0o600 for what only its owner may read.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover from a crash keeps its permissions if reopened
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, what, exc, then=then) from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # a writer that streams (fedcrm score) can fail half-way for other causes
        raise


def write_text_atomically(path: Path, text: str, *, what: str, then: str = "", mode: int = 0o666) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")), what=what, then=then, mode=mode)


def create_once(path: Path, data: bytes, *, what: str, then: str = "", mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless it exists: whole, or (on failure) not at all.

    For a file that must never change once made (a region's secret): the data is written and fsynced
    under a name of its own, then linked into place, which fails if another process made it first.
    Returns False when the file already existed (the other process's file stands).
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise storage_error(path, what, exc, then=then) from None
    finally:
        tmp.unlink(missing_ok=True)


def append_to(fd: int, data: bytes) -> None:
    """Append ``data`` to the open file and fsync; on failure, cut the file back and re-raise.

    A write that fails half-way (no space left) would otherwise leave a torn last line, which every
    later reader and writer of an append-only log must refuse.
    """
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):  # if even that fails, readers report the torn last line
            os.ftruncate(fd, size)
        raise


def write_json_atomically(path: Path, obj: Any, *, what: str, then: str = "") -> None:
    """Replace ``path`` with ``obj`` as indented, key-sorted JSON (creating its folder): all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", what=what, then=then)


def append_line(path: Path, line: str, *, what: str, then: str = "") -> None:
    """Append one line to a text log durably; after a torn last line (a crash), start on a fresh line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        append_to(fd, (("\n" if torn else "") + line.rstrip("\n") + "\n").encode("utf-8"))
    except OSError as exc:
        raise storage_error(path, what, exc, then=then) from None
    finally:
        os.close(fd)
