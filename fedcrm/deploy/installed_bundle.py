"""The folder an approved bundle runs from: Flower's install folder, made to hold the approved bytes exactly.

Flower 1.42 installs a bundle into ``FLWR_HOME/apps/<publisher>.<name>.<version>.<first 8 hex digits of
its SHA-256>`` and, when that folder exists, loads it as it is, without extracting again
(``flwr/cli/install.py``: ``validate_and_install`` returns the existing path). The gate approves
*bytes*, not folders: a folder left by a revoked bundle of the same name and version (whose hash shares
those 8 digits, some 2^32 tries to grind), a file added to an approved one, or a ``__pycache__`` whose
stale ``.pyc`` Python prefers to the approved source, would all run under the approved bundle's name.

So the gated ClientApp process, once a bundle is approved and before Flower loads it, compares every
file under the folder with the approved bundle's members (paths and SHA-256). A folder that differs in
any way (a missing, changed or extra file, a link, anything but plain files and folders) is deleted and
extracted again from the approved bytes, then checked once more; a folder that still differs is refused.
The gated process writes no bytecode (:func:`fedcrm.deploy.gate.run_gated_clientapp`), so an approved
folder stays byte-for-byte the bundle and is reused as Flower intends.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import shutil
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedcrm.deploy.approval import NOT_APPROVED
from fedcrm.deploy.bundle import MANIFEST_DIR
from fedcrm.errors import BundleRefused

__all__ = ["bundle_files", "install_approved", "installed_files"]

log = logging.getLogger("fedcrm.region")


def bundle_files(content: bytes) -> dict[str, str]:
    """Relative path -> SHA-256 of every file Flower's install writes from the bundle ``content``."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        return {
            info.filename: hashlib.sha256(fab.read(info)).hexdigest()
            for info in fab.infolist()
            if not info.is_dir() and not info.filename.startswith(MANIFEST_DIR)
        }


def installed_files(folder: Path) -> dict[str, str] | None:
    """Relative path -> SHA-256 of every file under ``folder``; None if it holds anything but plain files
    and folders (a link could point the loader anywhere)."""
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            mode = os.lstat(Path(root) / name).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return None
        for name in files:
            path = Path(root) / name
            found[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time checks and replaces a folder: another one may be about to load it."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    else:
        shutil.rmtree(folder)


def install_approved(*, content: bytes, fab_id: str, version: str, digest: str) -> Path:
    """Flower's install folder for the approved bundle ``content``, holding exactly its files; returns it.

    ``fab_id``, ``version`` and ``digest`` are the approved bundle's (the gate checked that the run names
    them). Raises :class:`BundleRefused` if the folder cannot be made to hold the approved bytes.
    """
    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_dir

    folder = get_project_dir(fab_id, version, digest)
    expected = bundle_files(content)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if (folder.exists() or folder.is_symlink()) and installed_files(folder) != expected:
            log.warning("install folder %s does not hold approved bundle %s: deleted, extracted again", folder, digest)
            _remove(folder)
        if not folder.exists():
            install_from_fab(content, skip_prompt=True)
        if not folder.is_dir() or folder.is_symlink() or installed_files(folder) != expected:
            raise BundleRefused(
                f"{NOT_APPROVED}: after extracting bundle {digest}, its install folder {folder} does not hold "
                "exactly the approved files"
            )
    return folder
