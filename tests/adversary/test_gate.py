"""The region's bundle gate against a submitter who ships code (issue 23, item 8).

Two ways around the gate on fedcrm 0.1: a bundle that ships ``fedcrm/`` passed when a component entry
named a ``fedcrm`` module (the "own packages" were read from the bundle), and Flower 1.42 reuses an
install folder keyed by 8 hex digits of the bundle's hash without extracting again, so the files of a
revoked bundle (same name and version) ran under a later approved one. Bundles here are real FABs built
by Flower's own builder; the gated process's steps are the gate's pull check, then Flower's own install.
"""

from __future__ import annotations

import io
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from flwr.cli.install import install_from_fab
from flwr.common.config import get_project_dir
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

import fedcrm
from fedcrm.deploy.approval import CARRIES_SAFEGUARDS, RegionTrust, bundle_digest, check_bundle, load_trust
from fedcrm.deploy.bundle import build_bundle
from fedcrm.deploy.gate import _gate
from fedcrm.errors import BundleRefused

# The probe app's writer lives beside the deploy tests that use it most.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from probe_app import write_probe_app  # noqa: E402

# Flower's build of an app without fab-include patterns goes through pathspec's deprecated matcher.
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def _app(folder: Path, *, marker: str = "m", clientapp: str = "clients.client_app:app", ship: str = "") -> Path:
    """The probe app (tests/deploy/probe_app.py; its ClientApp code names ``marker``), its clientapp
    component set to ``clientapp``, with an installed package's name ``ship`` beside its thin apps."""
    app = write_probe_app(folder, marker=folder.parent / marker, requires=f"=={fedcrm.__version__}")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"clients.client_app:app"', f'"{clientapp}"'))
    if ship:  # a copy whose ledger never refuses, whose noise is zero
        (app / ship / "fl").mkdir(parents=True)
        for module in ("__init__.py", "client_app.py", "fl/__init__.py", "fl/client.py"):
            (app / ship / module).write_text("app = None\n")
    return app


def _trust(tmp_path: Path, *bundles: bytes) -> RegionTrust:
    path = tmp_path / "trust.yaml"
    path.write_text(yaml.safe_dump({"approved_bundles": [bundle_digest(b) for b in bundles]}))
    return load_trust(path)


@pytest.mark.parametrize(
    ("package", "clientapp"), [("fedcrm", "fedcrm.fl.client:app"), ("opacus", "opacus.client_app:app")]
)
def test_bundle_shipping_an_installed_package_named_by_its_component_is_refused(
    tmp_path: Path, package: str, clientapp: str
) -> None:
    """The bundle's ClientApp is its own copy of an installed package, and it ships no ``clients`` (whose
    presence would have been refused on 0.1 anyway: ``clients`` is installed with fedcrm)."""
    app = _app(tmp_path / "app", clientapp=clientapp, ship=package)
    shutil.rmtree(app / "clients")
    fab = build_bundle(app)
    assert f"{package}/__init__.py" in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    with pytest.raises(BundleRefused, match=CARRIES_SAFEGUARDS) as refused:
        check_bundle(content=fab, signature="", trust=_trust(tmp_path, fab))
    assert f"['{package}']" in str(refused.value)


def test_component_that_picks_an_installed_module_as_the_client_app_is_refused(tmp_path: Path) -> None:
    """No package shipped beside ``server``: the bundle names which of the region's installed modules to
    import (and run at import) as its ClientApp."""
    app = _app(tmp_path / "app", clientapp="fedcrm.fl.client:app")
    shutil.rmtree(app / "clients")
    fab = build_bundle(app)
    with pytest.raises(BundleRefused, match=CARRIES_SAFEGUARDS) as refused:
        check_bundle(content=fab, signature="", trust=_trust(tmp_path, fab))
    assert "['fedcrm']" in str(refused.value) and "components" in str(refused.value)


def _gated_install(fab: bytes, *, trust: RegionTrust) -> Path:
    """What a gated ClientApp process does with a pulled bundle before it loads it: the gate's check on the
    pull, then Flower's own install (flwr/supernode/runtime/run_clientapp.py); returns the folder it loads."""
    digest = bundle_digest(fab)
    run = Run.create_empty(7)
    run.fab_id, run.fab_version, run.fab_hash = "fedcrmtest/probe", "1.0.0", digest
    pull = _gate(lambda client: (None, None, run, Fab(digest, fab, {})), trust=trust)
    _, _, run, pulled = pull(None)
    install_from_fab(pulled.content, skip_prompt=True)
    return get_project_dir(run.fab_id, run.fab_version, pulled.hash_str)


def _unpack(fab: bytes, into: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        for name in z.namelist():
            if not name.startswith(".info/"):
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                (into / name).write_bytes(z.read(name))


def test_a_revoked_bundles_files_never_run_under_a_later_approved_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    revoked = build_bundle(_app(tmp_path / "revoked", marker="sends-rows-home"))
    approved = build_bundle(_app(tmp_path / "approved", marker="reviewed"))
    # The revoked bundle's files sit in the folder Flower keys on the approved one's name, version and 8
    # hash digits: a submitter who ground the revoked bundle's hash to those digits got it there when it
    # was still approved, and the owner's revocation removed its hash only.
    folder = get_project_dir("fedcrmtest/probe", "1.0.0", bundle_digest(approved))
    _unpack(revoked, folder)
    loaded = _gated_install(approved, trust=_trust(tmp_path, approved))
    assert loaded == folder
    assert "reviewed" in (folder / "clients" / "client_app.py").read_text()
    # A file the bundle does not have (a stale .pyc Python would run instead of the source) goes too.
    (folder / "clients" / "__pycache__").mkdir()
    (folder / "clients" / "__pycache__" / "client_app.cpython-311.pyc").write_bytes(b"not the reviewed code")
    _gated_install(approved, trust=_trust(tmp_path, approved))
    assert not (folder / "clients" / "__pycache__").exists()
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names == {n for n in zipfile.ZipFile(io.BytesIO(approved)).namelist() if not n.startswith(".info/")}
