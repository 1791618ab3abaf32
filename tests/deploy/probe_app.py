"""A minimal Flower app whose ClientApp leaves a marker file the moment its code is imported.

It proves "refused before its code runs": a region that refuses the bundle must leave no marker. The
ServerApp sends one query to every node and writes each reply (or error reason) to a JSON file. Neither
app imports fedcrm or torch, so a run costs only Flower's own process starts.
"""

from __future__ import annotations

import json
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.fedcrm]
requires-fedcrm = "{requires}"

[tool.flwr.app]
publisher = "fedcrmtest"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "clients.client_app:app"

[tool.flwr.app.config]
result = ""
bundle-signature = ""
"""

SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    deadline = time.time() + 60
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({"q": MetricRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{"error": r.error.reason} if r.has_error() else {"ok": int(r.content["m"]["ok"])} for r in replies]
    Path(str(context.run_config["result"])).write_text(json.dumps({"nodes": len(nodes), "replies": out}))
"""

CLIENT = """\
from pathlib import Path

Path({marker!r}).write_text("the bundle's ClientApp code ran")

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({{"m": MetricRecord({{"ok": 1}})}}), reply_to=msg)
"""


def write_probe_app(
    app_dir: Path, *, marker: Path, name: str = "probe", ship_fedcrm: bool = False, requires: str = "==0.2.*"
) -> Path:
    """Write the probe app into ``app_dir``; ``ship_fedcrm`` adds a ``fedcrm/`` that marks its import too."""
    (app_dir / "server").mkdir(parents=True, exist_ok=True)
    (app_dir / "clients").mkdir(exist_ok=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT.format(name=name, requires=requires))
    for pkg in ("server", "clients"):
        (app_dir / pkg / "__init__.py").write_text("")
    (app_dir / "server" / "server_app.py").write_text(SERVER)
    (app_dir / "clients" / "client_app.py").write_text(CLIENT.format(marker=str(marker)))
    if ship_fedcrm:
        (app_dir / "fedcrm").mkdir(exist_ok=True)
        fedcrm_marker = marker.with_name(marker.name + ".fedcrm")
        (app_dir / "fedcrm" / "__init__.py").write_text(
            f"from pathlib import Path\nPath({str(fedcrm_marker)!r}).write_text('bundled fedcrm ran')\n"
            "__version__ = '0.1.0'\n"
        )
    return app_dir


def read_result(path: Path) -> dict[str, object]:
    return dict(json.loads(path.read_text()))
