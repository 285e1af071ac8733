"""Point-in-time feature snapshots: SQL in the warehouse, streamed through ADBC to Parquet.

A snapshot holds the features of every entity active as of a date D, computed only from
facts dated before D (``sql/features/<use case>_features.sql``). A training snapshot
also carries the label (``..._labels.sql``), which exists only once its horizon has
passed. Snapshots are immutable and content-addressed: the file name is the sha256 of its
bytes, so the same warehouse history always yields the same file and hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import db
from pipeline.config import Settings, UseCase
from pipeline.errors import DataError

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 65_536


@dataclass(frozen=True)
class Snapshot:
    """An immutable Parquet file of features (and labels, for training) as of a date."""

    use_case: str
    as_of: date
    path: Path
    sha256: str
    rows: int
    labelled: bool

    def as_xcom(self) -> dict[str, Any]:
        return {
            "use_case": self.use_case,
            "as_of": self.as_of.isoformat(),
            "path": str(self.path),
            "sha256": self.sha256,
            "rows": self.rows,
            "labelled": self.labelled,
        }

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            use_case=data["use_case"],
            as_of=date.fromisoformat(data["as_of"]),
            path=Path(data["path"]),
            sha256=data["sha256"],
            rows=int(data["rows"]),
            labelled=bool(data["labelled"]),
        )


def label_end(uc: UseCase, as_of: date) -> date:
    """First day after the label window [as_of, as_of + horizon)."""
    return as_of + timedelta(days=uc.label_horizon_days)


def training_dates(uc: UseCase, run_date: date) -> tuple[list[date], date]:
    """Snapshot dates for a model trained by the run scoring ``run_date``.

    The holdout is the newest snapshot whose label window closed before ``run_date``.
    Training snapshots are older still, and their label windows close on or before the
    holdout date, so no training label overlaps the holdout period (out-of-time).

    Returns:
        (training dates, oldest first; holdout date)
    """
    horizon = timedelta(days=uc.label_horizon_days)
    holdout = run_date - horizon
    newest_train = holdout - horizon
    step = timedelta(days=uc.snapshot_step_days)
    dates = [newest_train - i * step for i in range(uc.train_snapshots)]
    return sorted(dates), holdout


def _canonical(schema: pa.Schema) -> pa.Schema:
    """The schema without driver metadata, so the bytes depend on the data only."""
    return pa.schema([pa.field(f.name, f.type, f.nullable) for f in schema])


def _rebatch(reader: pa.RecordBatchReader, schema: pa.Schema, size: int) -> Iterator[pa.Table]:
    """Fixed-size chunks whatever batch sizes the driver chose (stable Parquet bytes)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending, schema=schema)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending = rest.to_batches()
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(pending, schema=schema)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_snapshot(
    settings: Settings,
    uc: UseCase,
    as_of: date,
    *,
    labelled: bool = False,
    known_through: date | None = None,
) -> Snapshot:
    """Compute the features as of ``as_of`` in the warehouse and write them to Parquet.

    Args:
        as_of: features use facts dated strictly before this day.
        labelled: also attach the label ([as_of, as_of + horizon)).
        known_through: the run's own date; labels must have matured before it.

    Raises:
        DataError: labels not matured yet, or the population is empty.
        SourceError: the warehouse or a source table is missing.
    """
    end = label_end(uc, as_of)
    if labelled and known_through is not None and end > known_through:
        raise DataError(
            f"labels for {uc.name} as of {as_of} mature on {end} but the run only knows "
            f"facts before {known_through}; use an earlier snapshot date"
        )
    params = {"as_of": as_of}
    labels = None
    if labelled:
        labels = db.read_arrow(
            settings.warehouse_url,
            db.sql_text("features", uc.labels_sql),
            {"as_of": as_of, "label_end": end},
            schema=settings.warehouse_schema,
        )
    target_dir = (
        settings.snapshots / uc.name / ("training" if labelled else "features") / f"as_of={as_of}"
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".building-{os.getpid()}.parquet"
    rows = 0
    with db.arrow_reader(
        settings.warehouse_url,
        db.sql_text("features", uc.features_sql),
        params,
        schema=settings.warehouse_schema,
    ) as reader:
        schema = _canonical(reader.schema)
        if labels is not None:
            schema = schema.append(pa.field("label", pa.int32()))
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            feature_schema = _canonical(reader.schema)
            for chunk in _rebatch(reader, feature_schema, ROW_GROUP_ROWS):
                if labels is not None:
                    chunk = _attach_labels(chunk, labels, rows, uc, as_of)
                writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)
                rows += chunk.num_rows
        finally:
            writer.close()
    if rows == 0:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"empty population: no {uc.entity_key} is active as of {as_of} in the warehouse "
            f"(schema {settings.warehouse_schema!r}); check that the warehouse holds data "
            f"before {as_of} (nightscore warehouse seed/advance) and that the date is right"
        )
    if labels is not None and labels.num_rows != rows:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"label population for {as_of} has {labels.num_rows} rows, features have {rows}; "
            "the feature and label SQL must define the same population"
        )
    sha = _sha256(tmp)
    path = target_dir / f"{sha[:16]}.parquet"
    os.replace(tmp, path)
    log.info("snapshot %s as of %s: %d rows, sha256 %s", uc.name, as_of, rows, sha[:16])
    return Snapshot(uc.name, as_of, path, sha, rows, labelled)


def _attach_labels(
    chunk: pa.Table, labels: pa.Table, offset: int, uc: UseCase, as_of: date
) -> pa.Table:
    part = labels.slice(offset, chunk.num_rows)
    if not part.column(uc.entity_key).equals(chunk.column(uc.entity_key)):
        raise DataError(
            f"feature and label rows for {as_of} are not aligned on {uc.entity_key}; both "
            "queries must select the same population ordered by the key"
        )
    return chunk.append_column("label", part.column("label").cast(pa.int32()))


def read_snapshot(snapshot: Snapshot, columns: list[str] | None = None) -> pa.Table:
    """Read a snapshot (all columns, or only ``columns``), verifying its content hash first."""
    verify(snapshot)
    return pq.read_table(snapshot.path, columns=columns)


def verify(snapshot: Snapshot) -> None:
    found = _sha256(snapshot.path) if snapshot.path.exists() else "missing file"
    if found != snapshot.sha256:
        raise DataError(
            f"snapshot {snapshot.path} should have sha256 {snapshot.sha256[:16]}, found "
            f"{found[:16]}; snapshots are immutable: rebuild it with build_features"
        )


def feature_columns(schema: pa.Schema, uc: UseCase) -> list[str]:
    return [n for n in schema.names if n not in (uc.entity_key, "label")]


def find_snapshot(settings: Settings, uc: UseCase, as_of: date, sha256: str) -> Snapshot:
    """The scoring snapshot with this content hash; rebuilt (it is deterministic) if gone."""
    path = settings.snapshots / uc.name / "features" / f"as_of={as_of}" / f"{sha256[:16]}.parquet"
    if path.exists():
        rows = pq.ParquetFile(path).metadata.num_rows
        return Snapshot(uc.name, as_of, path, sha256, rows, False)
    rebuilt = build_snapshot(settings, uc, as_of)
    if rebuilt.sha256 != sha256:
        raise DataError(
            f"the feature snapshot of {uc.name} as of {as_of} is gone and rebuilding it gave "
            f"sha256 {rebuilt.sha256[:16]}, not {sha256[:16]}: the warehouse history before "
            f"{as_of} changed since that night was published"
        )
    return rebuilt
