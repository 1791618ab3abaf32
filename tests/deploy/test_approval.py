"""Which bundles a region accepts (fedcrm.deploy.approval): the checks the gate runs on a bundle's bytes.

Bundles are real FABs, built by Flower's own builder from a probe app on disk; keys are real Ed25519.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml
from probe_app import write_probe_app

from fedcrm.deploy.approval import (
    CARRIES_SAFEGUARDS,
    NOT_APPROVED,
    WRONG_FEDCRM,
    RegionTrust,
    bundle_digest,
    check_bundle,
    check_installed_fedcrm,
    load_trust,
    sign_bundle,
)
from fedcrm.deploy.bundle import build_bundle
from fedcrm.deploy.certs import create_bundle_signing_key, create_node_key
from fedcrm.deploy.local import default_app_dir
from fedcrm.errors import BundleRefused, ConfigError


def _trust(tmp_path: Path, **fields: object) -> RegionTrust:
    path = tmp_path / "trust.yaml"
    path.write_text(yaml.safe_dump(fields))
    return load_trust(path)


def _bundle(tmp_path: Path, name: str = "probe", **kw: object) -> bytes:
    return build_bundle(write_probe_app(tmp_path / name, marker=tmp_path / f"{name}.marker", name=name, **kw))  # type: ignore[arg-type]


def _refusal(*, content: bytes, signature: str = "", trust: RegionTrust) -> str:
    with pytest.raises(BundleRefused) as e:
        check_bundle(content=content, signature=signature, trust=trust)
    return str(e.value)


def test_fedcrm_app_bundle_carries_only_the_thin_apps_and_configs() -> None:
    # Fails on the old pyproject, whose fab-include shipped /fedcrm/**/*.py to every region.
    names = zipfile.ZipFile(io.BytesIO(build_bundle(default_app_dir()))).namelist()
    assert not [n for n in names if n.startswith("fedcrm/")], names
    assert {"clients/client_app.py", "server/server_app.py"} <= set(names)
    assert {n.split("/", 1)[0] for n in names} <= {"pyproject.toml", "clients", "server", "configs", ".info"}


def test_fedcrm_app_bundle_passes_the_gate_once_approved(tmp_path: Path) -> None:
    fab = build_bundle(default_app_dir())
    assert NOT_APPROVED in _refusal(content=fab, trust=_trust(tmp_path))
    approval = check_bundle(content=fab, signature="", trust=_trust(tmp_path, approved_bundles=[bundle_digest(fab)]))
    assert (approval.fab_id, approval.approver) == ("fedcrm/fedcrm", "approved_bundles")


def test_signature_by_a_trusted_signer_approves_and_any_change_voids_it(tmp_path: Path) -> None:
    key, pub = create_bundle_signing_key(out_dir=tmp_path / "keys", name="compliance")
    other_key, _ = create_bundle_signing_key(out_dir=tmp_path / "keys", name="stranger")
    trust = _trust(tmp_path, trusted_signers={"compliance": str(pub)})
    fab = _bundle(tmp_path)
    good = sign_bundle(digest=bundle_digest(fab), private_key=key)
    assert check_bundle(content=fab, signature=good, trust=trust).approver == "signer compliance"
    # A signature by a key the region does not trust, garbage, or none at all.
    stranger = sign_bundle(digest=bundle_digest(fab), private_key=other_key)
    for bad in (stranger, "not base64!", ""):
        assert NOT_APPROVED in _refusal(content=fab, signature=bad, trust=trust)
    # The reviewed bundle with one file changed afterwards, submitted with the old signature.
    app = tmp_path / "probe"
    (app / "clients" / "client_app.py").write_text((app / "clients" / "client_app.py").read_text() + "# later\n")
    tampered = build_bundle(app)
    assert NOT_APPROVED in _refusal(content=tampered, signature=good, trust=trust)


def test_approved_bundle_that_ships_fedcrm_or_an_installed_package_is_refused(tmp_path: Path) -> None:
    shipping = _bundle(tmp_path, "shipping", ship_fedcrm=True)
    why = _refusal(content=shipping, trust=_trust(tmp_path, approved_bundles=[bundle_digest(shipping)]))
    assert CARRIES_SAFEGUARDS in why and "['fedcrm']" in why
    # Any installed package is as dangerous as fedcrm (opacus without noise, a numpy that logs rows).
    app = write_probe_app(tmp_path / "numpy-app", marker=tmp_path / "m")
    (app / "numpy").mkdir()
    (app / "numpy" / "__init__.py").write_text("")
    fab = build_bundle(app)
    why = _refusal(content=fab, trust=_trust(tmp_path, approved_bundles=[bundle_digest(fab)]))
    assert CARRIES_SAFEGUARDS in why and "['numpy']" in why


@pytest.mark.parametrize("requires", ["==0.1.*", ">=1.0", ""])
def test_bundle_written_for_another_fedcrm_is_refused(tmp_path: Path, requires: str) -> None:
    fab = _bundle(tmp_path, requires=requires)
    why = _refusal(content=fab, trust=_trust(tmp_path, approved_bundles=[bundle_digest(fab)]))
    assert WRONG_FEDCRM in why and "0.2.0" in why


def test_trust_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trust.yaml: unknown keys \['approved'\]"):
        _trust(tmp_path, approved=["x"])
    with pytest.raises(ConfigError, match=r"approved_bundles\[0\] must be 64 lowercase hex digits, found 'abc'"):
        _trust(tmp_path, approved_bundles=["abc"])
    _, node_public = create_node_key(out_dir=tmp_path / "node-keys", region="eu")  # a P-384 SuperNode key
    with pytest.raises(ConfigError, match=r"trusted_signers.node: expected an Ed25519 public key"):
        _trust(tmp_path, trusted_signers={"node": str(node_public)})
    with pytest.raises(ConfigError, match=r"trusted_signers.gone: cannot read the public key file"):
        _trust(tmp_path, trusted_signers={"gone": "missing.pub"})


def test_client_app_refuses_a_fedcrm_loaded_from_or_shipped_in_its_app_folder(tmp_path: Path) -> None:
    import fedcrm

    # The folder fedcrm is loaded from, taken as the app folder: fedcrm "came from the bundle".
    with pytest.raises(BundleRefused, match=CARRIES_SAFEGUARDS):
        check_installed_fedcrm(app_dir=Path(fedcrm.__file__).resolve().parents[1])
    app = write_probe_app(tmp_path / "app", marker=tmp_path / "m")
    check_installed_fedcrm(app_dir=app)  # a clean app folder: the installed fedcrm is used
    write_probe_app(app, marker=tmp_path / "m", ship_fedcrm=True)
    with pytest.raises(BundleRefused, match=CARRIES_SAFEGUARDS):
        check_installed_fedcrm(app_dir=app)


def test_cli_signs_what_the_gate_accepts_and_region_exec_stops_on_a_broken_trust_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcrm.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["bundle", "keygen", "--out", str(tmp_path / "keys"), "--name", "compliance"])
    assert made.exit_code == 0, made.output
    probe = write_probe_app(tmp_path / "probe", marker=tmp_path / "m")
    key = tmp_path / "keys" / "bundle-signer-compliance.key"
    signed = runner.invoke(app, ["bundle", "sign", str(probe), "--key", str(key)])
    assert signed.exit_code == 0, signed.output
    digest = signed.output.split("sha256 ", 1)[1].split()[0]
    signature = signed.output.split('bundle-signature="', 1)[1].split('"', 1)[0]
    hashed = runner.invoke(app, ["bundle", "hash", str(probe)])
    assert hashed.output.strip() == digest == bundle_digest(build_bundle(probe))
    trust = _trust(tmp_path, trusted_signers={"compliance": str(tmp_path / "keys" / "bundle-signer-compliance.pub")})
    assert check_bundle(content=build_bundle(probe), signature=signature, trust=trust).approver == "signer compliance"

    (tmp_path / "bad.yaml").write_text("approved_bundles: [nothex]\n")
    res = runner.invoke(app, ["region", "exec", "--runtime-api-address", "127.0.0.1:9", "--insecure",
                              "--trust", str(tmp_path / "bad.yaml")])  # fmt: skip
    assert res.exit_code == 2 and "approved_bundles[0] must be 64 lowercase hex digits" in res.output, res.output
