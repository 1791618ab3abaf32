"""What a data owner sets on their node: the region, its data file, its state folder, its policy, its schema.

One shape for every way a region runs. On a real SuperNode its data owner writes it as ``--node-config``
(:meth:`NodeSettings.from_node_config` reads it there); where this machine plays every data owner (the
simulation, ``fedcrm deploy local``, and a data owner's own forget and retrain commands),
:func:`region_settings` builds it from the experiment's config, and :meth:`NodeSettings.node_config`
writes the same keys. The keys are the data owners' public interface: renaming one breaks their nodes.
Nothing here comes from the server, which never sends a path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedcrm.config import NODE_PATH_PLACEHOLDER, ExperimentConfig
from fedcrm.errors import DataError

# The node-config keys (``flower-supernode --node-config 'region="eu" data-path="/data/eu.csv" ...'``).
REGION: Final = "region"
DATA_PATH: Final = "data-path"
STATE_DIR: Final = "state-dir"
POLICY_PATH: Final = "policy-path"
DELIMITER: Final = "delimiter"  # the data file's CSV delimiter, when the owner fixes it (else the schema's)
# The owner's schema: who a customer is, the label, consent and sensitive columns, the features it allows.
# A region without one refuses every run (fedcrm.data.schema_match): the server's schema is only a request.
SCHEMA_PATH: Final = "schema-path"
REQUIRED: Final = (REGION, DATA_PATH, STATE_DIR)


@dataclass(frozen=True)
class NodeSettings:
    """What the data owner sets on their node: nothing of this comes from the server."""

    region: str
    data_path: Path
    state_dir: Path
    policy_path: Path | None = None
    delimiter: str | None = None  # the data file's CSV delimiter, when the owner fixes it (else the schema's)
    schema_path: Path | None = None  # the owner's schema; without it the region refuses every run

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        missing = [k for k in REQUIRED if not node_config.get(k)]
        if missing:
            raise DataError(
                f"this node's config lacks {missing}: start the SuperNode with "
                '--node-config \'region="eu" data-path="/data/eu.csv" state-dir="/var/lib/fedcrm/eu"\''
            )
        policy = node_config.get(POLICY_PATH)
        return cls(
            region=str(node_config[REGION]),
            data_path=Path(str(node_config[DATA_PATH])),
            state_dir=Path(str(node_config[STATE_DIR])),
            policy_path=Path(str(policy)) if policy else None,
            delimiter=str(node_config[DELIMITER]) if node_config.get(DELIMITER) else None,
            schema_path=Path(str(node_config[SCHEMA_PATH])) if node_config.get(SCHEMA_PATH) else None,
        )

    def node_config(self) -> dict[str, str]:
        """The ``--node-config`` values that :meth:`from_node_config` reads back as these settings."""
        values = {REGION: self.region, DATA_PATH: str(self.data_path), STATE_DIR: str(self.state_dir)}
        if self.policy_path is not None:
            values[POLICY_PATH] = str(self.policy_path)
        if self.delimiter is not None:
            values[DELIMITER] = self.delimiter
        if self.schema_path is not None:
            values[SCHEMA_PATH] = str(self.schema_path)
        return values


def _absolute(path: Path) -> Path:
    # A node started elsewhere (a SuperNode, a Ray actor) has its own working directory. A region named
    # without a file (deployment) keeps its placeholder, so the error that follows names it as written.
    if path.parts and path.parts[0] == NODE_PATH_PLACEHOLDER:
        return path
    return path.resolve()


def _owner_schema(cfg: ExperimentConfig, region: str) -> Path:
    """The schema file ``region``'s data owner declares where this machine plays them: ``region_schemas``,
    else the config's schema (the shipped tables' owners declare the shipped schema)."""
    return _absolute(cfg.region_schemas.get(region, cfg.schema_path))


def owner_settings(
    cfg: ExperimentConfig, *, region: str, data_path: Path, state_dir: Path, policy_path: Path | None
) -> NodeSettings:
    """A region's settings for a data owner's own command on a table and state they name (an audit)."""
    return NodeSettings(
        region=region,
        data_path=Path(data_path),
        state_dir=Path(state_dir),
        policy_path=policy_path,
        schema_path=_owner_schema(cfg, region),
    )


def region_settings(cfg: ExperimentConfig, *, state_root: Path) -> dict[str, NodeSettings]:
    """Every region's settings as its data owner would set them, where this machine plays every owner.

    Each region's state is ``state_root/<region>``; its file, policy and delimiter are the config's. Its
    schema is the one ``region_schemas`` names for it, else the config's schema file (as the data owner of a
    simulated region on the shipped tables would declare it): the region checks every plan the server sends
    against this copy of its own, not against the server's text.
    """
    return {
        name: NodeSettings(
            region=name,
            data_path=_absolute(Path(path)),
            state_dir=(Path(state_root) / name).resolve(),
            policy_path=_absolute(cfg.policies[name]) if name in cfg.policies else None,
            delimiter=cfg.region_delimiters.get(name),
            schema_path=_owner_schema(cfg, name),
        )
        for name, path in cfg.regions.items()
    }
