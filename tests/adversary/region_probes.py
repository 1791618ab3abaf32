"""The server's side of a probe: a plan, a message, and the reply a region's ClientApp sends back.

Shared by the failure and count attacks (test_failures.py, test_counts.py): each builds a region on
real files and asks it through :func:`fedcrm.fl.client.answer`, the function every handler replies with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from conftest import REPO, write_tiny_config
from flwr.app import Context, Message, MessageType, RecordDict

from fedcrm import wire
from fedcrm.config import ExperimentConfig, load_config
from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.schema import schema_from_text
from fedcrm.fl import client
from fedcrm.fl.codec import extend, plan_config, to_record
from fedcrm.models import build_model, get_weights
from fedcrm.node_settings import NodeSettings
from fedcrm.region import Region

SCHEMA = str(REPO / "configs" / "schemas" / "synthetic_crm.yaml")
SCHEMA_TEXT = Path(SCHEMA).read_text(encoding="utf-8")


def tiny_federation(tmp_path: Path, *, customers: int, overrides: dict | None = None) -> tuple[ExperimentConfig, Path]:
    """A one-region config (region ``eu``, synthetic customers) and the region's table."""
    cfg = load_config(write_tiny_config(tmp_path, regions={"eu": customers}, overrides=overrides))
    return cfg, Path(cfg.regions["eu"])


def edited_table(table: Path, out: Path, edit: Any) -> Path:
    """A copy of ``table`` with ``edit(frame)`` applied (all cells as text, as a data owner's export)."""
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    edit(frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def node(
    tmp_path: Path, *, data: Path, state: str = "state", policy: dict | None = None, schema: str = SCHEMA
) -> Context:
    """The node config a data owner gives region ``eu``: its table, state folder, policy file and schema."""
    # `schema-path`: the owner's own schema (the shipped one), for regions that own theirs (issue 23 item 1).
    node_config = {"region": "eu", "data-path": str(data), "state-dir": str(tmp_path / state), "schema-path": schema}
    if policy is not None:
        path = tmp_path / f"{state}-policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        node_config["policy-path"] = str(path)
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def ask(
    kind: str,
    cfg: ExperimentConfig,
    context: Context,
    *,
    schema_text: str = SCHEMA_TEXT,
    shard: int = 0,
    run_id: str = "probe",
) -> RecordDict:
    """The region's reply to one server message: ``describe`` (the pre-flight) or ``train`` (one round)."""
    plan = plan_config(cfg, schema_text=schema_text, run_id=run_id)
    if kind == "describe":
        msg = Message(
            content=RecordDict({wire.CONFIG: extend(plan, {wire.ACTION: wire.ACTION_DESCRIBE})}),
            dst_node_id=1,
            message_type=MessageType.QUERY,
        )
        return client.answer(client._query, msg, context)
    schema = schema_from_text(schema_text, source="probe")
    model = build_model(cfg.model, n_features=FeatureEncoder(schema).n_features, seed=0)
    content = {
        wire.CONFIG: extend(plan, {wire.SHARD: shard, wire.ROUND: 1}),
        wire.ARRAYS: to_record(get_weights(model)),
    }
    msg = Message(content=RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)  # type: ignore[arg-type]
    return client.answer(client._train, msg, context)


def owner_region(context: Context) -> Region:
    """The region as its data owner's own tools open it (exact counts), on the node's files and state."""
    return Region(NodeSettings.from_node_config(dict(context.node_config)))


def seen(reply: RecordDict) -> dict[str, Any]:
    """What the server can read off a reply, noise-free: its status and its public figures (not weights)."""
    out: dict[str, Any] = {f"status/{k}": v for k, v in reply[wire.STATUS].items() if k != wire.REGION}
    if wire.METRICS in reply:
        out |= {f"metrics/{k}": v for k, v in reply[wire.METRICS].items()}
    out["records"] = sorted(reply.keys())
    return out
