"""The errors a fedcrm user can meet, one class per kind of problem.

Every user-facing check raises one of these (never ``assert``), with a message that names the file,
row or key, what was expected and what was found.
"""

from __future__ import annotations

from fedcrm import wire


class FedcrmError(Exception):
    """Base of every error fedcrm raises on purpose."""


class ConfigError(FedcrmError):
    """An experiment config, schema file or policy file is invalid."""


class DataError(FedcrmError):
    """A customer table does not match its declared schema."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = ":".join(str(p) for p in (path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        col = f"column `{column}`: " if column else ""
        super().__init__(f"{prefix}{col}{message}")


class RefusalError(FedcrmError):
    """A region refuses a request. ``code`` is what the server is told (one of ``wire.REFUSAL_CODES``);
    the message, which may name exact counts, stays at the region (its log and audit log)."""

    default_code: str = wire.REFUSED_BY_POLICY

    def __init__(self, message: str, *, code: str | None = None) -> None:
        code = self.default_code if code is None else code
        if code not in wire.REFUSAL_CODES:
            raise ValueError(f"refusal code must be one of {sorted(wire.REFUSAL_CODES)}, got {code!r}")
        self.code = code
        super().__init__(message)


class PrivacyBudgetError(RefusalError):
    """A DP release would exceed the region's privacy budget, or the ledger is inconsistent."""

    default_code = wire.REFUSED_BUDGET


class PolicyError(RefusalError):
    """A run asks for something the region's policy does not allow."""


class FederationError(FedcrmError):
    """The federation cannot go on (too few regions, a bad update, a broken message)."""


class UnlearningError(FedcrmError):
    """An erasure or consent withdrawal cannot be served as asked."""


class StorageError(FedcrmError):
    """A durable file (ledger, audit log, metrics, checkpoint) is missing, torn or corrupted."""


class BundleRefused(PolicyError):
    """A region refuses to run an app bundle (FAB): not approved by its data owner, or unsafe to load."""


class RegionDataUnusable(RefusalError, DataError):
    """The region's table cannot be read or does not meet its schema. The server is told one fixed code
    whichever check failed; the message, for the data owner (their commands, the region's log and audit
    log), keeps the details (file, line, column). A DataError too, so the owner's tools read it as one."""

    default_code = wire.REFUSED_DATA_UNUSABLE


# The refusal codes a region's policy, budget or consent gives (the README's exit code 3). A region that
# could not read its data, or found the server's message or schema wrong, refused for another reason (2).
PRIVACY_REFUSALS = frozenset(
    {
        wire.REFUSED_PURPOSE,
        wire.REFUSED_COLUMN,
        wire.REFUSED_PRIVACY_MODE,
        wire.REFUSED_NOISE,
        wire.REFUSED_SHARD_SIZE,
        wire.REFUSED_BUDGET,
        wire.REFUSED_BY_POLICY,
        wire.REFUSED_SHARDS,
        wire.REFUSED_MODEL_SIZE,
    }
)


class FederationRefused(FederationError):
    """The federation cannot go on because regions refused it on privacy grounds (budget, policy): the
    server's counterpart of a region's own PolicyError / PrivacyBudgetError, so it exits 3 as they do.
    ``refused``: region -> its refusal code."""

    def __init__(self, message: str, *, refused: dict[str, str]) -> None:
        self.refused = dict(refused)
        super().__init__(message)


def federation_stopped(message: str, *, refused: dict[str, str], others: bool) -> FederationError:
    """The error that stops a federation short of regions: :class:`FederationRefused` when every region
    left out refused on privacy grounds (``others``: some region failed or was rejected instead)."""
    if refused and not others and set(refused.values()) <= PRIVACY_REFUSALS:
        return FederationRefused(message, refused=refused)
    return FederationError(message)
