"""fedcrm's Flower ServerApp, for deployment (``flwr run``); simulation uses the same library call.

The experiment config comes from the run config key ``experiment-config``: a path inside the app
(``configs/demo.yaml``), resolved against the installed app directory, or an absolute path on the
SuperLink's machine. The run folder comes from ``run-dir`` (empty: ``OUTPUT_DIR/NAME`` of the config),
the node registry (which node id the operator registered for which region) from ``node-registry``.
``overrides`` changes config values for this run as ``fedcrm run --set`` does, space-separated
(``flwr run . --run-config 'overrides="training.rounds=20 privacy.target_epsilon=1"'``): typed and
validated like the file, and recorded in the run's config.yaml. A retrain of some constituents
(``fedcrm retrain RUN_DIR --federation NAME``) adds ``shards`` (``"1,3"``: train only these),
``initial-dir`` (the other constituents' weights, ``constituent-K.npz``) and ``model-version``.

Why the app directory: in deployment the ServerApp runs in a ``flwr-serverapp`` process whose working
directory is wherever ``flower-superlink`` was started, while the code (and the configs shipped with
it) is unpacked into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/``. Only the region
*names* of the config matter here: each region's data file is set on its own SuperNode
(``--node-config``) and never sent by the server, so a config's ``regions`` paths (or ``split:``
section) are not read on this side.
"""

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.config import ExperimentConfig, load_config
from fedcrm.fl.grid import PromptGrid
from fedcrm.fl.registry import NodeRegistry
from fedcrm.fl.server import run_federation
from fedcrm.overrides import parse_override_text

APP_DIR = Path(__file__).resolve().parents[1]

app = ServerApp()


def resolve_app_path(value: str, *, app_dir: Path = APP_DIR) -> Path:
    """An absolute path as given; a relative one against the app directory, not the working directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else app_dir / path


def experiment_config(run_config: dict[str, Any], *, app_dir: Path = APP_DIR) -> ExperimentConfig:
    """The experiment config named by the run config, with the run config's ``overrides`` applied."""
    path = resolve_app_path(str(run_config["experiment-config"]), app_dir=app_dir)
    cfg = load_config(path)
    text = str(run_config.get("overrides", "") or "").strip()
    if text:
        option = "run config `overrides`"
        cfg = cfg.with_overrides(parse_override_text(text, option=option), source=f"{path} + {option}")
    return cfg


def retrain_arguments(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_federation``'s retrain arguments from the run config; none for an ordinary run."""
    from fedcrm.runs import load_weights

    shards = str(run_config.get("shards", "") or "")
    if not shards:
        return {}
    initial_dir = resolve_app_path(str(run_config["initial-dir"]))
    initial = {int(p.stem.removeprefix("constituent-")): load_weights(p) for p in initial_dir.glob("constituent-*.npz")}
    return {
        "shards": [int(k) for k in shards.split(",")],
        "initial": initial,
        "model_version": int(run_config["model-version"]),
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = experiment_config(dict(context.run_config))
    run_dir_value = str(context.run_config.get("run-dir", "") or "")
    run_dir = resolve_app_path(run_dir_value) if run_dir_value else cfg.output_dir / cfg.name
    registry_value = str(context.run_config.get("node-registry", "") or "")
    registry = NodeRegistry(resolve_app_path(registry_value)) if registry_value else None
    # Replies looked for every 0.1 s, not Flower's 3 s: each message phase of a run waited that long.
    run_federation(
        PromptGrid(grid), cfg, run_dir=run_dir, registry=registry, **retrain_arguments(dict(context.run_config))
    )
