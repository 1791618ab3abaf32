"""Which app bundles a region runs: its data owner's approval, checked before any bundle code starts.

An app bundle (Flower's FAB: a zip of the thin apps and configs) is code that a submitter chose and
that would run next to the region's customer table. A region therefore runs a bundle only when

1. its data owner approved it: the bundle's SHA-256 is in the region's ``approved_bundles``, or the
   run carries an Ed25519 signature over that hash by a key in the region's ``trusted_signers``
   (run config key ``bundle-signature``; a signature is public, only the keys decide);
2. it carries none of the region's safeguards: Flower puts the bundle's folder first on ``sys.path``,
   so a ``fedcrm/`` (or any other installed package) inside the bundle would replace the region's
   policy, ledger and wire check with the submitter's copy. Only the app's own packages (``clients``,
   ``server``, fixed here, whatever the bundle's component entries say) may come from the bundle, and
   its components must live in them;
3. it was written for the fedcrm installed here: ``[tool.fedcrm] requires-fedcrm`` in the bundle's
   ``pyproject.toml`` (a PEP 440 specifier) must match this host's fedcrm version.

Everything here reads the bundle as bytes (a zip listing and one TOML file); nothing of it is
imported or executed. The region's trust file (YAML, on the region's host, set by its data owner)::

    approved_bundles: [<sha256 hex>, ...]        # fedcrm bundle hash APP
    trusted_signers:                             # name -> Ed25519 public key: a path or the key line
      compliance: signers/compliance.pub
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.specifiers import InvalidSpecifier, SpecifierSet

import fedcrm
from fedcrm.errors import BundleRefused, ConfigError
from fedcrm.yamlio import read_yaml_mapping

__all__ = [
    "SIGNATURE_KEY",
    "Approval",
    "RegionTrust",
    "approval_message",
    "bundle_digest",
    "check_bundle",
    "load_trust",
    "sign_bundle",
]

SIGNATURE_KEY = "bundle-signature"  # the run config key a signature travels in
# Signatures are over this prefix and the hex digest: a key used for bundles signs nothing else by accident.
_DOMAIN = b"fedcrm app bundle approval v1\n"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRUST_KEYS = {"approved_bundles", "trusted_signers"}
# Fixed reasons: what the server is told. The detail (hashes, file names) stays in the region's log.
NOT_APPROVED = "bundle not approved by the region's data owner"
CARRIES_SAFEGUARDS = "bundle carries packages the region installs itself"
# The only top-level packages a bundle may ship that could also be installed here: the thin apps.
APP_PACKAGES = frozenset({"clients", "server"})
WRONG_FEDCRM = "bundle was written for another fedcrm version"


def bundle_digest(content: bytes) -> str:
    """The bundle's SHA-256 as hex: what Flower calls the FAB hash, computed here from the bytes."""
    return hashlib.sha256(content).hexdigest()


def approval_message(digest: str) -> bytes:
    return _DOMAIN + digest.encode("ascii")


def sign_bundle(*, digest: str, private_key: Path) -> str:
    """A detached approval of bundle ``digest``: base64 of an Ed25519 signature by ``private_key`` (PEM)."""
    key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{private_key}: expected an Ed25519 private key (fedcrm bundle keygen), found {type(key)}")
    return base64.b64encode(key.sign(approval_message(digest))).decode("ascii")


@dataclass(frozen=True)
class RegionTrust:
    """What a region's data owner approved: bundle hashes and the keys whose signature approves one."""

    source: Path
    approved: frozenset[str]
    signers: Mapping[str, Ed25519PublicKey]

    def approves(self, *, digest: str, signature: str) -> str | None:
        """Who approved ``digest`` (the allowlist or a signer's name), or None."""
        if digest in self.approved:
            return "approved_bundles"
        if not signature:
            return None
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return None
        for name, key in self.signers.items():
            try:
                key.verify(raw, approval_message(digest))
            except InvalidSignature:
                continue
            return f"signer {name}"
        return None


def _public_key(value: str, *, base: Path, where: str) -> Ed25519PublicKey:
    text = value.strip()
    if not text.startswith(("ssh-ed25519 ", "-----BEGIN")):
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read the public key file {path}: {e.strerror}") from e
    try:
        key = (
            serialization.load_pem_public_key(text.encode())
            if text.startswith("-----BEGIN")
            else serialization.load_ssh_public_key(text.encode())
        )
    except ValueError as e:
        raise ConfigError(f"{where}: not a public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: expected an Ed25519 public key, found {type(key).__name__}")
    return key


def load_trust(path: Path) -> RegionTrust:
    """Read a region's trust file; unknown keys and malformed hashes or keys are errors, never skipped."""
    path = Path(path).resolve()
    data = read_yaml_mapping(path)
    unknown = set(data) - _TRUST_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected {sorted(_TRUST_KEYS)})")
    approved = data.get("approved_bundles") or []
    if not isinstance(approved, list):
        raise ConfigError(f"{path}: approved_bundles must be a list of SHA-256 hex digests, found {approved!r}")
    for i, h in enumerate(approved):
        if not isinstance(h, str) or not _HEX64.match(h):
            raise ConfigError(f"{path}: approved_bundles[{i}] must be 64 lowercase hex digits, found {h!r}")
    signers_raw = data.get("trusted_signers") or {}
    if not isinstance(signers_raw, dict):
        raise ConfigError(f"{path}: trusted_signers must map a name to a public key, found {signers_raw!r}")
    signers = {
        str(name): _public_key(str(value), base=path.parent, where=f"{path}: trusted_signers.{name}")
        for name, value in signers_raw.items()
    }
    return RegionTrust(source=path, approved=frozenset(approved), signers=signers)


# --- what the bundle holds ---------------------------------------------------------------------


def _top_level_modules(names: list[str]) -> set[str]:
    """Names the bundle's folder would make importable: top-level packages and modules."""
    out = set()
    for name in names:
        first, _, rest = name.partition("/")
        if rest and rest.endswith((".py", ".pyc", ".so")):
            out.add(first)
        elif not rest and first.endswith((".py", ".pyc", ".so")):
            out.add(first.split(".", 1)[0])
    return out


def _table(doc: Any, *keys: str) -> dict[str, Any]:
    """``doc[k1][k2]...`` of a parsed TOML document, or {} where a level is missing or not a table."""
    for key in keys:
        doc = doc.get(key, {}) if isinstance(doc, dict) else {}
    return doc if isinstance(doc, dict) else {}


def _installed(module: str, *, distributed: Mapping[str, Any]) -> bool:
    """Whether this host would import ``module`` from its own installation (a name it cannot look up: yes).

    Both the import system (find_spec: what ``import module`` finds now, the standard library included) and
    the installed distributions' top-level names, ``distributed`` (what a package installs even where
    find_spec misses it).
    """
    if module == "fedcrm" or module in distributed:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return True  # fail closed: a name the import system chokes on is not let through


def _component_packages(pyproject: dict[str, Any]) -> set[str]:
    components = _table(pyproject, "tool", "flwr", "app", "components")
    refs = components.values() if isinstance(components, dict) else []
    return {str(ref).split(":", 1)[0].split(".", 1)[0] for ref in refs}


@dataclass(frozen=True)
class Approval:
    """A bundle the region will run: its hash, Flower app id and version, and who approved it."""

    digest: str
    fab_id: str
    version: str
    approver: str


def check_bundle(*, content: bytes, signature: str, trust: RegionTrust) -> Approval:
    """Return the approval of the bundle; raise :class:`BundleRefused` (a fixed reason first) otherwise.

    Approval is checked first, so an unapproved bundle is refused without even reading its listing.
    """
    digest = bundle_digest(content)
    approver = trust.approves(digest=digest, signature=signature)
    if approver is None:
        raise BundleRefused(
            f"{NOT_APPROVED}: sha256 {digest} is not in approved_bundles of {trust.source} and the run "
            f"carries no valid signature by one of its trusted_signers {sorted(trust.signers)}"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            pyproject = tomli.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomli.TOMLDecodeError) as e:
        raise BundleRefused(f"{NOT_APPROVED}: not a readable app bundle ({e})") from e
    others = _top_level_modules(names) - APP_PACKAGES
    # Read only when needed: listing every distribution costs ~0.2 s, and the apps ship nothing else.
    distributed = importlib.metadata.packages_distributions() if others else {}
    shadowing = sorted(m for m in others if _installed(m, distributed=distributed))
    if shadowing:
        raise BundleRefused(
            f"{CARRIES_SAFEGUARDS}: the bundle ships {shadowing}, which would replace this host's installed "
            "copy (Flower puts the bundle first on sys.path); the region's safeguards come only from its own "
            "installation"
        )
    # The app's own packages are fixed here, never read from the bundle: before 0.2.0 the bundle's component
    # entries named them, so a bundle whose clientapp was `fedcrm.fl.client:app` could ship its own fedcrm.
    foreign = sorted(_component_packages(pyproject) - APP_PACKAGES)
    if foreign:
        raise BundleRefused(
            f"{CARRIES_SAFEGUARDS}: pyproject.toml [tool.flwr.app.components] names {foreign}; an app's "
            f"components must live in its own packages {sorted(APP_PACKAGES)}"
        )
    wanted = _table(pyproject, "tool", "fedcrm").get("requires-fedcrm")
    try:
        spec = SpecifierSet(str(wanted)) if wanted else None
    except InvalidSpecifier:
        spec = None
    if spec is None or not spec.contains(fedcrm.__version__, prereleases=True):
        raise BundleRefused(
            f"{WRONG_FEDCRM}: pyproject.toml [tool.fedcrm] requires-fedcrm is {wanted!r}, this region runs "
            f"fedcrm {fedcrm.__version__}"
        )
    project, publisher = _table(pyproject, "project"), _table(pyproject, "tool", "flwr", "app").get("publisher", "")
    fab_id = f"{publisher}/{project.get('name', '')}"
    return Approval(digest=digest, fab_id=fab_id, version=str(project.get("version", "")), approver=approver)


def check_installed_fedcrm(*, app_dir: Path) -> None:
    """Refuse to serve a region when ``fedcrm`` is (or would be) imported from the app bundle's folder.

    Called by the thin ClientApp at import, after Flower put ``app_dir`` first on ``sys.path``: the
    region's policy, ledger and wire check must be its installed fedcrm, never a copy in the bundle.
    (The gate refuses such a bundle before it is unpacked; this catches a ClientApp loaded some other way.)
    """
    app_dir = Path(app_dir).resolve()
    loaded = Path(str(fedcrm.__file__)).resolve()
    shipped = [p for p in (app_dir / "fedcrm", app_dir / "fedcrm.py") if p.exists()]
    if loaded.is_relative_to(app_dir) or shipped:
        raise BundleRefused(
            f"{CARRIES_SAFEGUARDS}: fedcrm is loaded from {loaded} and the app folder {app_dir} ships "
            f"{[str(p) for p in shipped]}; the region's fedcrm must be the one installed on this host"
        )
