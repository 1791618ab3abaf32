"""Tests of fedcrm.deploy.certs: the CA, the SuperLink's TLS certificate and the data owners' SuperNode keys."""

from __future__ import annotations

import importlib
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedcrm.deploy.certs import CertificateBundle, create_certificates, create_node_key
from fedcrm.errors import ConfigError


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise InvalidSignature (or ValueError) unless ``issuer`` signed ``cert``."""
    cert.verify_directly_issued_by(issuer)


@pytest.fixture()
def node_keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Each data owner's key pair, made in their own folder (their own host)."""
    return {r: create_node_key(out_dir=tmp_path / "owners" / r, region=r) for r in ("eu", "us")}


@pytest.fixture()
def bundle(tmp_path: Path, node_keys: dict[str, tuple[Path, Path]]) -> CertificateBundle:
    return create_certificates(out_dir=tmp_path / "certs", node_public_keys={r: k[1] for r, k in node_keys.items()})


def test_bundle_paths_exist(bundle: CertificateBundle) -> None:
    for p in (bundle.ca_key, bundle.ca_cert, bundle.server_key, bundle.server_cert):
        assert p.is_file()
        assert p.parent == bundle.out_dir
    assert bundle.regions == ("eu", "us")
    with pytest.raises(AttributeError):
        bundle.ca_key = Path("x")  # type: ignore[misc]


def test_the_operator_never_makes_or_holds_a_regions_private_key(
    bundle: CertificateBundle, node_keys: dict[str, tuple[Path, Path]]
) -> None:
    """Old code wrote supernode-REGION.key for every region into the operator's folder."""
    assert sorted(p.name for p in bundle.out_dir.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert not hasattr(bundle, "supernode_private_keys")
    for region, (private, public) in node_keys.items():
        assert private.parent == public.parent and private.parent.name == region  # the owner's own folder
        assert private.parent != bundle.out_dir


@pytest.mark.parametrize(("ca_days", "server_days"), [(730, 365), (90, 30)])
def test_lifetimes_are_what_was_asked_and_at_most_two_years_by_default(
    tmp_path: Path, ca_days: int, server_days: int
) -> None:
    """Old code forced the CA to at least 10 years whatever was asked."""
    import datetime as dt

    b = create_certificates(out_dir=tmp_path / "c", ca_valid_days=ca_days, valid_days=server_days)
    ca, server = _load_cert(b.ca_cert), _load_cert(b.server_cert)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == dt.timedelta(days=ca_days)
    assert server.not_valid_after_utc - server.not_valid_before_utc == dt.timedelta(days=server_days)
    default = _load_cert(create_certificates(out_dir=tmp_path / "d").ca_cert)
    assert default.not_valid_after_utc - default.not_valid_before_utc <= dt.timedelta(days=2 * 365)


def test_a_certificate_may_not_outlive_its_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="may not outlive its CA"):
        create_certificates(out_dir=tmp_path / "c", ca_valid_days=30, valid_days=365)
    with pytest.raises(ConfigError, match=">= 1 day"):
        create_certificates(out_dir=tmp_path / "c", ca_valid_days=0)


def test_a_public_key_that_flower_would_not_load_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "eu.pub"
    bad.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5zv5P2pQkVbQvB9y5rYH0o0z0N0m8k2n7b0o8YyQkN x\n")
    with pytest.raises(ConfigError, match="EC key on a NIST curve"):
        create_certificates(out_dir=tmp_path / "c", node_public_keys={"eu": bad})
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a SuperNode public key"):
        create_certificates(out_dir=tmp_path / "c", node_public_keys={"eu": bad})


def test_two_regions_with_one_key_are_refused(tmp_path: Path, node_keys: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ConfigError, match="same public key"):
        same = node_keys["eu"][1]
        create_certificates(out_dir=tmp_path / "c", node_public_keys={"eu": same, "us": same})


def test_a_node_key_is_never_overwritten(node_keys: dict[str, tuple[Path, Path]]) -> None:
    private, _ = node_keys["eu"]
    before = private.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_node_key(out_dir=private.parent, region="eu")
    assert private.read_bytes() == before


def test_private_keys_are_0600(bundle: CertificateBundle, node_keys: dict[str, tuple[Path, Path]]) -> None:
    private = [bundle.ca_key, bundle.server_key, *(k[0] for k in node_keys.values())]
    for p in private:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in [bundle.ca_cert, bundle.server_cert, *(k[1] for k in node_keys.values())]:
        assert not stat.S_IMODE(p.stat().st_mode) & 0o022, p


def test_server_cert_chains_to_ca(bundle: CertificateBundle) -> None:
    ca = _load_cert(bundle.ca_cert)
    server = _load_cert(bundle.server_cert)
    _verify_signed_by(server, ca)
    _verify_signed_by(ca, ca)  # self-signed root
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_server_cert_chain_verifies_for_hosts(bundle: CertificateBundle) -> None:
    """Full path validation, as a TLS client does it (name matching included)."""
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = _load_cert(bundle.ca_cert)
    server = _load_cert(bundle.server_cert)
    builder = PolicyBuilder().store(Store([ca]))
    builder.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(server, [])
    with pytest.raises(x509.verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("example.org")).verify(server, [])


def test_server_cert_has_sans(tmp_path: Path) -> None:
    b = create_certificates(
        out_dir=tmp_path / "c",
        hosts=("superlink.example.org", "localhost", "10.0.0.5", "::1"),
    )
    san = _load_cert(b.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert b.hosts == ("superlink.example.org", "localhost", "10.0.0.5", "::1")


def test_default_sans_are_loopback(bundle: CertificateBundle) -> None:
    san = _load_cert(bundle.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_server_key_matches_cert(bundle: CertificateBundle) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), password=None)
    cert = _load_cert(bundle.server_cert)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_cert_from_other_ca_does_not_verify(tmp_path: Path, bundle: CertificateBundle) -> None:
    other = create_certificates(out_dir=tmp_path / "other")
    ca = _load_cert(bundle.ca_cert)
    foreign_server = _load_cert(other.server_cert)
    with pytest.raises((InvalidSignature, ValueError)):
        _verify_signed_by(foreign_server, ca)
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(foreign_server, [])


def test_region_private_keys_load_like_flower_supernode(node_keys: dict[str, tuple[Path, Path]]) -> None:
    """`flower-supernode --auth-supernode-private-key` loads the file with `load_ssh_private_key`
    (imported in flwr.supernode.cli.flower_supernode) and requires an EC key."""
    # `flwr.supernode.cli.flower_supernode` is also the name of a function exported by the package:
    # import the module itself.
    flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")

    for region, (path, _) in node_keys.items():
        key = flower_supernode.load_ssh_private_key(path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), region
        assert isinstance(key.curve, ec.SECP384R1)


def test_region_private_keys_pass_flower_supernode_setup(node_keys: dict[str, tuple[Path, Path]]) -> None:
    import argparse

    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for path, _ in node_keys.values():
        args = argparse.Namespace(auth_supernode_private_key=str(path), auth_supernode_public_key=None)
        pair = _try_setup_client_authentication(args)
        assert pair is not None
        assert isinstance(pair[0], ec.EllipticCurvePrivateKey)


def test_region_public_keys_load_like_flwr_supernode_register(node_keys: dict[str, tuple[Path, Path]]) -> None:
    """`flwr supernode register PUBLIC_KEY` loads the file with `try_load_public_key`
    (flwr.cli.supernode.register): OpenSSH format, EC on a NIST curve."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    for priv, pub_path in node_keys.values():
        pem = try_load_public_key(pub_path)
        public = bytes_to_public_key(pem)
        from flwr.supernode.cli.flower_supernode import load_ssh_private_key

        private = load_ssh_private_key(priv.read_bytes(), None)
        assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
        assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_region_keys_are_distinct(node_keys: dict[str, tuple[Path, Path]]) -> None:
    pubs = {k[1].read_text().split()[1] for k in node_keys.values()}
    assert len(pubs) == len(node_keys)


def test_refuses_to_overwrite(bundle: CertificateBundle) -> None:
    before = bundle.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_certificates(out_dir=bundle.out_dir)
    assert bundle.ca_cert.read_bytes() == before
    again = create_certificates(out_dir=bundle.out_dir, overwrite=True)
    assert again.ca_cert.read_bytes() != before
    assert stat.S_IMODE(again.ca_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("region", ["", "../eu", "eu/west", "-eu", "a b"])
def test_bad_region_names(tmp_path: Path, region: str) -> None:
    with pytest.raises(ConfigError, match="region name"):
        create_node_key(out_dir=tmp_path / "c", region=region)
    assert not (tmp_path / "c").exists()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one host"):
        create_certificates(out_dir=tmp_path / "c", hosts=())
    with pytest.raises(ConfigError, match="neither an IP"):
        create_certificates(out_dir=tmp_path / "c", hosts=("bad host!",))
