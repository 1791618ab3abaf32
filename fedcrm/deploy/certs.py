"""TLS certificates and SuperNode authentication keys for a Flower 1.42 deployment.

``create_certificates`` writes, into one directory:

- ``ca.key`` / ``ca.crt``: a private certificate authority (EC P-384, self-signed). ``ca.crt`` is what
  every SuperNode (``flower-supernode --root-certificates``) and the ``flwr`` CLI
  (``root-certificates`` in ``$FLWR_HOME/config.toml``) trust; ``ca.key`` should then be moved
  offline.
- ``server.key`` / ``server.crt``: the SuperLink's TLS key and certificate, signed by the CA, with a
  SubjectAltName for every host the SuperLink is reached by (DNS names and IP addresses). Passed to
  ``flower-superlink --ssl-keyfile/--ssl-certfile`` together with ``--ssl-ca-certfile ca.crt``.
- ``supernode-<region>.key`` / ``supernode-<region>.pub``: one SuperNode authentication key pair per
  region, in the format Flower 1.42 reads: an EC key on a NIST curve (P-384, the curve Flower's own
  key generator uses), the private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key``, loaded with ``load_ssh_private_key``) and the public key as an
  OpenSSH one-line ``ecdsa-sha2-nistp384 ...`` entry (``flwr supernode register``, loaded with
  ``load_ssh_public_key``).

Private keys are written with mode 0600. Existing files are never overwritten unless asked: a new
CA silently replacing the one every region trusts would break the federation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcrm.errors import ConfigError

__all__ = ["CertificateBundle", "create_bundle_signing_key", "create_certificates", "supernode_key_paths"]

# Flower generates SuperNode keys on P-384 and accepts any NIST curve; P-384 is used throughout.
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_-]{1,63})*$")
_ORG = "fedcrm"


@dataclass(frozen=True)
class CertificateBundle:
    """Paths of everything :func:`create_certificates` wrote."""

    out_dir: Path
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    #: region -> path of the SuperNode's private key (OpenSSH format, mode 0600)
    supernode_private_keys: dict[str, Path]
    #: region -> path of the SuperNode's public key (one OpenSSH line)
    supernode_public_keys: dict[str, Path]
    hosts: tuple[str, ...]

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self.supernode_private_keys)


def supernode_key_paths(out_dir: Path, region: str) -> tuple[Path, Path]:
    """The (private, public) key paths of ``region``'s SuperNode inside ``out_dir``."""
    _check_region(region)
    return out_dir / f"supernode-{region}.key", out_dir / f"supernode-{region}.pub"


def create_certificates(
    *,
    out_dir: Path,
    regions: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 365,
    overwrite: bool = False,
) -> CertificateBundle:
    """Write a private CA, the SuperLink's TLS key/certificate and one SuperNode key pair per region.

    ``hosts`` are the names and addresses SuperNodes and the ``flwr`` CLI use to reach the
    SuperLink; each becomes a SubjectAltName (an IP address where it parses as one, otherwise a DNS
    name). Raises :class:`~fedcrm.errors.ConfigError` on a bad region or host name, on duplicate
    regions, or when a file to write exists already and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    regions = list(regions)
    hosts_t = tuple(hosts)
    if not hosts_t:
        raise ConfigError("create_certificates: at least one host is needed for the server certificate")
    for region in regions:
        _check_region(region)
    dupes = sorted({r for r in regions if regions.count(r) > 1})
    if dupes:
        raise ConfigError(f"create_certificates: duplicate regions {dupes}")
    sans = [_san(h) for h in hosts_t]
    if valid_days < 1:
        raise ConfigError(f"create_certificates: valid_days must be >= 1, got {valid_days}")

    ca_key_p, ca_crt_p = out_dir / "ca.key", out_dir / "ca.crt"
    srv_key_p, srv_crt_p = out_dir / "server.key", out_dir / "server.crt"
    node_paths = {r: supernode_key_paths(out_dir, r) for r in regions}
    targets = [ca_key_p, ca_crt_p, srv_key_p, srv_crt_p] + [p for pair in node_paths.values() for p in pair]
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise ConfigError(
                f"create_certificates: refusing to overwrite existing files {existing} "
                "(pass overwrite=True to replace them)"
            )
    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew

    # --- certificate authority -------------------------------------------------------------------
    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedcrm federation CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=max(valid_days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, _HASH())
    )

    # --- SuperLink server certificate ----------------------------------------------------------
    srv_key = ec.generate_private_key(_CURVE())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts_t[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )

    _write_private(ca_key_p, _pem_private(ca_key))
    _write_public(ca_crt_p, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(srv_key_p, _pem_private(srv_key))
    _write_public(srv_crt_p, srv_cert.public_bytes(serialization.Encoding.PEM))

    # --- SuperNode authentication keys (OpenSSH format, as flower-supernode / flwr expect) -------
    for region, (priv_p, pub_p) in node_paths.items():
        node_key = ec.generate_private_key(_CURVE())
        priv = node_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        )
        pub = node_key.public_key().public_bytes(
            encoding=serialization.Encoding.OpenSSH,
            format=serialization.PublicFormat.OpenSSH,
        )
        _write_private(priv_p, priv)
        _write_public(pub_p, pub + f" fedcrm-supernode-{region}\n".encode())

    return CertificateBundle(
        out_dir=out_dir,
        ca_key=ca_key_p,
        ca_cert=ca_crt_p,
        server_key=srv_key_p,
        server_cert=srv_crt_p,
        supernode_private_keys={r: p for r, (p, _) in node_paths.items()},
        supernode_public_keys={r: p for r, (_, p) in node_paths.items()},
        hosts=hosts_t,
    )


def create_bundle_signing_key(*, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write an Ed25519 key pair whose signatures approve app bundles: ``bundle-signer-NAME.key/.pub``.

    Made by whoever reviews bundles for a data owner (the owner, or a team the owner trusts). The
    private key (PEM, mode 0600) stays with that reviewer (``fedcrm bundle sign``); the public key (one
    ``ssh-ed25519`` line) goes into each region's trust file under ``trusted_signers``. Ed25519, not the
    SuperNodes' P-384: a separate key for a separate power, never the node's own.
    """
    _check_region(name)  # the same rule: the name becomes part of a file name
    out_dir = Path(out_dir)
    priv_p, pub_p = out_dir / f"bundle-signer-{name}.key", out_dir / f"bundle-signer-{name}.pub"
    existing = [str(p) for p in (priv_p, pub_p) if p.exists()]
    if existing:
        raise ConfigError(f"create_bundle_signing_key: refusing to overwrite existing files {existing}")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    _write_private(
        priv_p,
        key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ),
    )
    pub = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH, format=serialization.PublicFormat.OpenSSH
    )
    _write_public(pub_p, pub + f" fedcrm-bundle-signer-{name}\n".encode())
    return priv_p, pub_p


def _check_region(region: str) -> None:
    if not isinstance(region, str) or not _REGION_RE.match(region):
        raise ConfigError(
            f"create_certificates: region name {region!r} is not usable in a file name "
            "(letters, digits, '_', '-', '.', starting with a letter or digit, at most 63 characters)"
        )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise ConfigError(f"create_certificates: host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` so that the file is never readable by others, not even for a moment."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added: make it exact
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
