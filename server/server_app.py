"""fedcrm's Flower ServerApp, for deployment (``flwr run``); simulation uses the same library call.

The experiment config comes from the run config key ``experiment-config`` (a path inside the app),
and the run folder from ``run-dir``.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.config import load_config
from fedcrm.fl.server import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(Path(str(context.run_config["experiment-config"])))
    run_dir = Path(str(context.run_config.get("run-dir", "") or cfg.output_dir / cfg.name))
    run_federation(grid, cfg, run_dir=run_dir)
