"""The app bundle (FAB): what ``flwr run APP`` builds from the app folder and ships to the SuperLink.

Flower's build (``flwr.cli.build.build_fab_from_disk``) walks *every* file under the app folder and then
keeps those its rules select. fedcrm's app folder is its source checkout, whose virtual environment
alone holds ~100k files: each build took 8-9 s on this machine, and a run on a federation built it
twice (to sign it, then inside ``flwr run``) for a 20 KB bundle. Both builds are now fast, with the same
bytes:

- :func:`build_bundle` hands Flower's own build only the files its rules can select: when every
  ``fab-include`` pattern is anchored under a top-level folder (``/server/*.py``), those folders and the
  top-level files; Flower's filters then decide exactly as they would over the whole walk.
- :func:`stage_bundle` writes the bundle's files to a folder of their own, for ``flwr run`` to build
  from (its build of that folder is checked to give the same bytes).
"""

from __future__ import annotations

import io
import shutil
import tomllib
import zipfile
from pathlib import Path

from fedcrm.errors import ConfigError, FederationError

__all__ = ["build_bundle", "bundle_candidates", "stage_bundle"]

MANIFEST_DIR = ".info/"  # written by Flower's build into every bundle, never read from the app folder


def bundle_candidates(app_dir: Path) -> dict[str, Path]:
    """The files of ``app_dir`` that Flower's build rules could select (relative POSIX path -> file).

    Every file when a ``fab-include`` pattern is not anchored under a top-level folder (or there is none),
    as Flower's own walk; otherwise the top-level files and the files under the patterns' folders.
    """
    from flwr.cli.utils import collect_files

    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{pyproject}: not a Flower app's pyproject.toml ({e})") from None
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    roots = [_anchored_folder(p) for p in patterns or []]
    if not roots or None in roots:
        return collect_files(app_dir)
    files = {f.name: f for f in app_dir.iterdir() if f.is_file() and not f.is_symlink()}
    for root in sorted({r for r in roots if r is not None}):
        folder = app_dir / root
        if folder.is_dir() and not folder.is_symlink():
            files.update({f"{root}/{rel}": path for rel, path in collect_files(folder).items()})
    return files


def _anchored_folder(pattern: object) -> str | None:
    """``server`` for ``/server/*.py``: the top-level folder a pattern can only match under, if any."""
    if not isinstance(pattern, str) or not pattern.startswith("/") or "/" not in pattern[1:]:
        return None
    folder = pattern[1:].split("/", 1)[0]
    return None if not folder or any(c in folder for c in "*?[!\\") or folder in (".", "..") else folder


def build_bundle(app_dir: Path) -> bytes:
    """The bundle ``flwr run APP_DIR`` submits, byte for byte (Flower builds it deterministically)."""
    from flwr.cli.build import build_fab_from_files

    return bytes(build_fab_from_files(bundle_candidates(app_dir))[0])


def stage_bundle(app_dir: Path, *, into: Path) -> Path:
    """A fresh folder ``into`` holding exactly the files of ``app_dir``'s bundle; returns it.

    ``flwr run`` on it builds the same bytes as on ``app_dir`` without walking ``app_dir``; that is
    checked here, so a run is never submitted with a bundle other than the one signed.
    """
    bundle = build_bundle(app_dir)
    into = Path(into)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(bundle)) as fab:
        for name in fab.namelist():
            if not name.startswith(MANIFEST_DIR):
                target = into / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fab.read(name))
    if build_bundle(into) != bundle:
        raise FederationError(f"the bundle of {app_dir} does not rebuild the same from its files in {into}")
    return into
