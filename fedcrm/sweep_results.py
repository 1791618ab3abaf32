"""Reading a sweep folder's results table (``results.parquet``, else ``results.csv``; one row per cell).

Its own module so that the report can read a sweep without importing the sweep runner, which itself
writes each tracked cell's report (no import circle between :mod:`fedcrm.sweep` and :mod:`fedcrm.report`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedcrm.errors import FedcrmError

__all__ = ["read_results"]


def read_results(sweep_dir: Path) -> pd.DataFrame:
    p = sweep_dir / "results.parquet"
    if p.exists():
        return pd.read_parquet(p)
    if (sweep_dir / "results.csv").exists():
        return pd.read_csv(sweep_dir / "results.csv")
    raise FedcrmError(f"{sweep_dir}: no results.parquet or results.csv (is it a sweep folder?)")
