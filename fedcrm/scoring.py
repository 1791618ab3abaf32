"""Scoring a region's customers with a run's served model, at the region: nothing leaves the machine.

``fedcrm score`` reads the region's current table through the run's schema (the same validation as
training), leaves out forgotten customers and those without consent to the model's purpose (the rule of
:mod:`fedcrm.governance.eligibility`), and writes one row per scored customer: id, score, the served
model's version and, if asked, the columns that moved the score most, in points, worded as ``fedcrm
explain`` words them. The table is read in chunks, so memory stays flat however many customers there
are. The region's audit log records that a scoring took place (counts and model version, no ids).

:class:`ScoringModel` is the served model with the schema that encodes its input; the notebook API
(``fedcrm.load_model``) hands it out as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedcrm.data.encode import FeatureEncoder
from fedcrm.data.io import DEFAULT_CHUNK_ROWS, CustomerTable, iter_table, table_from_frame
from fedcrm.data.schema import Schema, load_schema
from fedcrm.durable import write_atomically
from fedcrm.errors import ConfigError, DataError
from fedcrm.evaluation.explain import (
    Contribution,
    attributions,
    by_column,
    reference_customer,
    sentences_by_rank,
    value_text,
)
from fedcrm.evaluation.served import ServedModel

if TYPE_CHECKING:
    import pyarrow as pa

OUTPUT_KINDS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class ScoringModel:
    """A run's served model and the schema its input goes through: scores and reasons for raw rows."""

    served: ServedModel
    schema: Schema
    run_dir: Path

    @classmethod
    def load(cls, run_dir: Path | str, *, schema: Path | str | None = None) -> ScoringModel:
        """The served model of ``run_dir`` (its current version), with the run's schema unless given."""
        run_dir = Path(run_dir)
        served = ServedModel.load(run_dir)
        schema_path = Path(schema) if schema else served.schema_path()
        if schema_path is None:
            raise ConfigError(f"{run_dir}: the run does not record its schema: give the schema file")
        sch = load_schema(schema_path)
        served.check_schema(sch)
        return cls(served=served, schema=sch, run_dir=run_dir)

    @property
    def version(self) -> int:
        return self.served.version

    @property
    def task(self) -> str:
        """The purpose the model serves (``churn``, ``propensity``): consent is asked for this one."""
        return str(self.served.config.get("task", ""))

    def score(self, table: CustomerTable, *, x: np.ndarray | None = None) -> np.ndarray:
        """The served score (probability) of every customer of a validated table (``x``: its encoding, if made)."""
        return self.served.proba(self.encode(table) if x is None else x)

    def encode(self, table: CustomerTable) -> np.ndarray:
        """The model's input for ``table``: made once a chunk, for its scores and its reasons."""
        return FeatureEncoder(self.schema).encode(table)

    def _ranked(
        self, table: CustomerTable, *, top: int, x: np.ndarray | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Column names, per-column contributions (n, columns), and each row's ``top`` columns, largest |points| first.

        A stable sort: of two columns that moved the score equally, the schema's first comes first.
        """
        x = self.encode(table) if x is None else x
        attr, _ = attributions(self.served.models, x, ref=reference_customer(self.schema))
        names, per_col = by_column(attr, FeatureEncoder(self.schema))
        order = np.argsort(-np.abs(per_col), axis=1, kind="stable")[:, : min(top, len(names))]
        return names, per_col, order

    def reasons(self, table: CustomerTable, *, top: int) -> list[list[Contribution]]:
        """Per customer, the ``top`` columns that moved the score most (largest |points| first)."""
        names, per_col, order = self._ranked(table, top=top)
        columns = {c.name: c for c in self.schema.model_columns}
        values = [table.values[n].to_numpy() for n in names]
        return [
            [
                Contribution(
                    column=names[j],
                    value=value_text(columns[names[j]], values[j][i]),
                    points=float(per_col[i, j]) * 100,
                )
                for j in order[i]
            ]
            for i in range(len(table))
        ]

    def reason_sentences(self, table: CustomerTable, *, top: int, x: np.ndarray | None = None) -> list[pa.Array]:
        """Per rank (first, second, ...), every customer's reason as :meth:`reasons` words it, as Arrow text.

        ``min(top, columns)`` arrays, the sentences of ``Contribution.sentence`` built a chunk at a time.
        """
        names, per_col, order = self._ranked(table, top=top, x=x)
        columns = {c.name: c for c in self.schema.model_columns}
        return sentences_by_rank(
            columns=[columns[n] for n in names],
            values=[table.values[n].to_numpy() for n in names],
            points=per_col * 100,
            order=order,
            task=self.task,
        )

    # -- the notebook API: raw rows in a DataFrame ---------------------------------------------------

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        """Scores of raw rows (the table's own spellings), validated by the schema like a file.

        The label, consent and sensitive columns are not needed: only the id (else the row's index)
        and the model's columns. Consent is not applied here: ``fedcrm score`` does that at the region.
        """
        return self.score(self._table(rows))

    def explain(self, rows: pd.DataFrame, *, top: int = 5) -> pd.DataFrame:
        """One row per input row and reason: customer_id, rank, column, value, points, text."""
        table = self._table(rows)
        return pd.DataFrame(
            [
                {
                    "customer_id": cid,
                    "rank": k + 1,
                    "column": c.column,
                    "value": c.value,
                    "points": c.points,
                    "text": c.sentence(self.task),
                }
                for cid, reasons in zip(table.ids, self.reasons(table, top=top), strict=True)
                for k, c in enumerate(reasons)
            ]
        )

    def _table(self, rows: pd.DataFrame) -> CustomerTable:
        return table_from_frame(rows, self.schema, source="the rows given", model_columns_only=True)


@dataclass
class ScoringResult:
    """What ``fedcrm score`` did: where the scores went, with which model, for how many customers."""

    out: Path
    region: str
    purpose: str
    model_version: int
    reasons: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "region": self.region,
            "purpose": self.purpose,
            "model_version": self.model_version,
            "reasons": self.reasons,
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.counts.get("customers_in_table", 0) / self.seconds) if self.seconds else None,
            "validation": self.validation,
        }


def score_region(
    *,
    region: str,
    model: ScoringModel,
    data: Path,
    state_dir: Path,
    out: Path,
    reasons: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    actor: str | None = None,
    delimiter: str | None = None,
) -> ScoringResult:
    """Score the region's usable customers into ``out`` (CSV or Parquet, all or nothing) and audit it."""
    from fedcrm.governance.audit_log import AuditAction
    from fedcrm.governance.audit_trail import finite, node_actor, region_audit_log
    from fedcrm.governance.eligibility import region_filters, usable_for

    kind = OUTPUT_KINDS.get(out.suffix.lower())
    if kind is None:
        raise ConfigError(f"--out {out}: expected a .csv or .parquet file name, found {out.suffix or 'no suffix'!r}")
    if reasons < 0:
        raise ConfigError(f"--reasons must be 0 or more, got {reasons}")
    model.schema.consent_for(model.task)  # a purpose the schema does not declare is refused here
    tombstones, withdrawals = region_filters(state_dir)
    counts = {"customers_in_table": 0, "forgotten": 0, "excluded_no_consent": 0, "scored": 0}
    started = time.perf_counter()
    report: dict[str, Any] = {}

    def frames() -> Iterator[pa.Table]:
        for chunk in iter_table(data, model.schema, chunk_rows=chunk_rows, delimiter=delimiter):
            usable, c = usable_for(chunk, purpose=model.task, tombstones=tombstones, withdrawals=withdrawals)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            counts["scored"] += len(usable)
            report.update(chunk.report.as_dict())
            yield _score_frame(model, usable, reasons=reasons)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda f: _write(frames(), f, kind=kind), what="write the scores")
    seconds = time.perf_counter() - started
    result = ScoringResult(
        out=out,
        region=region,
        purpose=model.task,
        model_version=model.version,
        reasons=reasons,
        counts=counts,
        seconds=seconds,
        validation=report,
    )
    region_audit_log(state_dir).append(
        actor=actor or node_actor(region),
        action=AuditAction.MODEL_SCORED,
        details=finite(
            {
                "run": model.run_dir.name,
                "purpose": model.task,
                "model_version": model.version,
                **counts,
                "reasons": reasons,
                "output_format": kind,
            }
        ),
    )
    return result


def _score_frame(model: ScoringModel, table: CustomerTable, *, reasons: int) -> pa.Table:
    """The output rows of one chunk, as an Arrow table straight away (a pandas frame would copy the ids)."""
    import pyarrow as pa

    x = model.encode(table) if len(table) else None
    columns: dict[str, pa.Array] = {
        "customer_id": pa.array(table.ids, type=pa.string()),
        # Types fixed even for an empty chunk (everyone forgotten or refusing): the writer keeps the first schema.
        "score": pa.array(model.score(table, x=x) if len(table) else np.empty(0), type=pa.float64()),
        "model_version": pa.array(np.full(len(table), model.version, dtype=np.int64)),
    }
    if reasons:
        ranked = model.reason_sentences(table, top=reasons, x=x) if len(table) else []
        for k in range(reasons):
            # More reasons asked than the model has columns: the extra ones are empty.
            columns[f"reason_{k + 1}"] = ranked[k] if k < len(ranked) else pa.array([""] * len(table), type=pa.string())
    return pa.table(columns)


def _write(batches: Iterator[pa.Table], f: IO[bytes], *, kind: str) -> None:
    """Stream the tables into one CSV or Parquet file, by Arrow's writers (pandas' CSV writer is 5x slower)."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | pa_csv.CSVWriter | None = None
    for batch in batches:
        if writer is None:
            writer = (
                pq.ParquetWriter(f, batch.schema)
                if kind == "parquet"
                else pa_csv.CSVWriter(f, batch.schema, write_options=pa_csv.WriteOptions(quoting_style="needed"))
            )
        writer.write_table(batch)
    if writer is None:  # iter_table yields a chunk or raises; kept so a file is never left without a header
        raise DataError("no customer rows to score")
    writer.close()
