"""Building the app bundle without walking the whole app folder: the same bytes as Flower's own build.

The reference is Flower's ``build_fab_from_disk`` (what ``flwr run APP`` submits): a bundle that differs
by one byte has another digest, and every region would refuse it as unapproved.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from probe_app import write_probe_app

from fedcrm.deploy.bundle import build_bundle, bundle_candidates, stage_bundle
from fedcrm.deploy.local import default_app_dir


def _anchored(app: Path) -> Path:
    """The probe app with fedcrm's kind of fab-include, and files outside it that Flower walks past."""
    pyproject = app / "pyproject.toml"
    include = 'fab-include = ["/server/*.py", "/clients/*.py", "/configs/**/*.yaml"]'
    pyproject.write_text(pyproject.read_text().replace("[tool.flwr.app]\n", f"[tool.flwr.app]\n{include}\n"))
    (app / "configs" / "nested").mkdir(parents=True)
    (app / "configs" / "nested" / "a.yaml").write_text("a: 1\n")
    (app / "configs" / "notes.txt").write_text("not a yaml: left out\n")
    (app / "server" / "__pycache__").mkdir()
    (app / "server" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (app / "server" / "secret.py").write_text("TOKEN = 1\n")
    (app / ".gitignore").write_text("server/secret.py\n")  # ignored files stay out, as in Flower's build
    venv = app / ".venv" / "lib" / "site-packages" / "server"  # a module named like the app's, elsewhere
    venv.mkdir(parents=True)
    for i in range(200):
        (venv / f"m{i}.py").write_text("x = 1\n")
    return app


@pytest.mark.parametrize("layout", ["anchored", "no-fab-include"])
def test_the_bundle_is_flowers_byte_for_byte(tmp_path: Path, layout: str) -> None:
    app = write_probe_app(tmp_path / "app", marker=tmp_path / "marker", name="probe")
    if layout == "anchored":
        app = _anchored(app)
        assert not [p for p in bundle_candidates(app) if p.startswith(".venv/")]  # not walked
    fab = build_bundle(app)
    assert fab == bytes(build_fab_from_disk(app))
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    if layout == "anchored":
        assert "configs/nested/a.yaml" in names
        assert not [n for n in names if "secret" in n or "pycache" in n or n.endswith(".txt") or ".venv" in n]


def test_fedcrms_own_bundle_is_flowers_and_its_staged_copy_rebuilds_it(tmp_path: Path) -> None:
    app = default_app_dir()
    fab = build_bundle(app)
    assert fab == bytes(build_fab_from_disk(app))  # Flower's walk of the source checkout (seconds)
    staged = stage_bundle(app, into=tmp_path / "staged")
    assert bytes(build_fab_from_disk(staged)) == fab  # what `flwr run STAGED` submits
    on_disk = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    in_bundle = sorted(n for n in zipfile.ZipFile(io.BytesIO(fab)).namelist() if not n.startswith(".info/"))
    assert on_disk == in_bundle


def test_staging_replaces_what_an_earlier_stage_left(tmp_path: Path) -> None:
    app = write_probe_app(tmp_path / "app", marker=tmp_path / "marker", name="probe")
    into = tmp_path / "staged"
    into.mkdir()
    (into / "stale.py").write_text("left from another app\n")
    stage_bundle(app, into=into)
    assert not (into / "stale.py").exists()
    assert bytes(build_fab_from_disk(into)) == build_bundle(app)
