"""Reproducible splits of one customer table into regions (jurisdictions or tenants).

The shipped public tables have no region column, so a split is fedcrm's own: by a seeded hash of the
customer id, by the value of a column, or label-skewed by Dirichlet proportions (the usual way to make
non-IID federations). Same seed, same files; every customer lands in exactly one region.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcrm.data.io import load_table, read_raw
from fedcrm.data.schema import Schema
from fedcrm.errors import ConfigError, DataError

_REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def stable_hash(value: str, *, key: str) -> int:
    """A 64-bit hash of ``value`` under ``key`` that is the same on every machine and Python run."""
    digest = hashlib.blake2b(value.encode("utf-8"), key=key.encode("utf-8")[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_buckets(ids: np.ndarray, *, buckets: int, key: str) -> np.ndarray:
    return np.fromiter((stable_hash(str(i), key=key) % buckets for i in ids), dtype=np.int64, count=len(ids))


@dataclass(frozen=True)
class SplitMethod:
    kind: str  # "hash", "column", "dirichlet"
    column: str | None = None
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> SplitMethod:
        if text == "hash":
            return cls("hash")
        kind, _, arg = text.partition(":")
        if kind == "column" and arg:
            return cls("column", column=arg)
        if kind == "dirichlet" and arg:
            try:
                alpha = float(arg)
            except ValueError:
                alpha = -1.0
            if alpha <= 0:
                raise ConfigError(f"--by dirichlet:ALPHA needs a positive number, got {arg!r}")
            return cls("dirichlet", alpha=alpha)
        raise ConfigError(f"--by must be hash, column:NAME or dirichlet:ALPHA, got {text!r}")


def assign_regions(
    *,
    ids: np.ndarray,
    labels: np.ndarray,
    regions: list[str],
    method: SplitMethod,
    seed: int,
    column_values: np.ndarray | None = None,
) -> np.ndarray:
    """Index into ``regions`` for every customer."""
    if method.kind == "hash":
        return hash_buckets(ids, buckets=len(regions), key=f"fedcrm-split-{seed}")
    if method.kind == "column":
        assert column_values is not None
        unknown = sorted(set(column_values) - set(regions))
        if unknown:
            raise ConfigError(
                f"--by column:{method.column}: expected every value of the column to be one of the regions "
                f"{regions}, found {unknown[:5]}"
            )
        lookup = {r: i for i, r in enumerate(regions)}
        return np.asarray([lookup[v] for v in column_values], dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty(len(ids), dtype=np.int64)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        # Order rows by a seeded hash of their id, so the assignment does not depend on file order.
        idx = idx[np.argsort(hash_buckets(ids[idx], buckets=2**62, key=f"fedcrm-order-{seed}"), kind="stable")]
        share = rng.dirichlet(np.full(len(regions), method.alpha))
        cuts = np.floor(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for r, part in enumerate(np.split(idx, cuts)):
            out[part] = r
    return out


def split_table(
    *, schema: Schema, input_path: Path, regions: list[str], method: SplitMethod, seed: int, out_dir: Path
) -> dict[str, Any]:
    """Write one file per region and ``manifest.json``; returns the manifest."""
    if len(set(regions)) != len(regions) or not regions:
        raise ConfigError(f"--regions must be distinct names, got {regions}")
    bad = [r for r in regions if not _REGION_NAME.match(r)]
    if bad:
        raise ConfigError(
            f"--regions: region name {bad[0]!r} must be letters, digits, '.', '_' or '-' (it becomes a file name)"
        )
    table = load_table(input_path, schema)  # validates the whole table first: nothing is written on error
    raw = read_raw(Path(input_path), schema, all_columns=True)  # rows are copied as they are
    position = {int(line): i for i, line in enumerate(raw.attrs["lines"])}
    raw = raw.iloc[[position[int(line)] for line in table.lines]].reset_index(drop=True)  # rows the schema keeps
    if schema.id.derive:
        # The derived id goes into the region file, so a customer keeps it after the split.
        if schema.id.derived_column in raw:
            raw[schema.id.derived_column] = table.ids
        else:
            raw.insert(0, schema.id.derived_column, table.ids)
    column_values = None
    if method.kind == "column":
        if method.column not in raw:
            raise DataError(
                f"expected a column {method.column!r} to split by, found none (the header has {list(raw.columns)})",
                path=str(input_path),
                line=1,
                column=method.column,
            )
        column_values = raw[method.column].astype(str).str.strip().to_numpy()
    region_of = assign_regions(
        ids=table.ids, labels=table.labels, regions=regions, method=method, seed=seed, column_values=column_values
    )
    counts = np.bincount(region_of, minlength=len(regions))
    if (counts == 0).any():
        empty = regions[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(
            f"region {empty} would get no customers; use fewer regions or another split "
            f"(--by {method.kind}, seed {seed})",
            path=str(input_path),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "schema": schema.name,
        "source": str(input_path),
        "by": method.kind,
        "seed": seed,
        "regions": {},
    }
    if method.column is not None:
        manifest["column"] = method.column
    if method.alpha is not None:
        manifest["alpha"] = method.alpha
    for r, name in enumerate(regions):
        part = raw[region_of == r]
        path = out_dir / f"{name}.csv"
        part.to_csv(path, index=False, sep=schema.delimiter or ",", lineterminator="\n")
        manifest["regions"][name] = {
            "file": path.name,
            "rows": len(part),
            "label_rate": round(float(table.labels[region_of == r].mean()), 4),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def remove_customers(path: Path, *, schema: Schema, customer_ids: set[str]) -> int:
    """Rewrite a region file made by :func:`split_table` without the given customers; return rows removed.

    Used when a customer is forgotten: the region files a ``split:`` config makes live inside the run
    folder, and the customer's row must not stay there. The other rows are written back as they were
    (text in, text out); the manifest's row count follows. All or nothing: a failed write leaves the
    old file.
    """
    from fedcrm.durable import write_text_atomically

    sep = schema.delimiter or ","
    id_column = schema.id.column or schema.id.derived_column
    raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    if id_column not in raw:
        raise DataError(
            f"expected an id column {id_column!r} in a region file made by `fedcrm data split`, "
            f"found {list(raw.columns)}",
            path=str(path),
            line=1,
        )
    gone = raw[id_column].str.strip().isin(customer_ids).to_numpy()
    if not gone.any():
        return 0
    write_text_atomically(
        path,
        raw[~gone].to_csv(index=False, sep=sep, lineterminator="\n"),
        what="remove forgotten customers from the region file",
    )
    manifest_path = path.parent / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        entry = manifest.get("regions", {}).get(path.stem)
        if entry is not None:
            entry["rows"] = int((~gone).sum())
            write_text_atomically(
                manifest_path, json.dumps(manifest, indent=2) + "\n", what="update the split's manifest"
            )
    return int(gone.sum())
