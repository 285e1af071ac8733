"""Point-in-time feature snapshots: SQL in the warehouse, streamed through ADBC to Parquet.

A snapshot holds the features of every entity active as of a date D, computed only from
facts dated before D (the use case's ``sql.features`` file). A training snapshot also
carries the label (``sql.labels``), which exists only once its horizon has passed. With
a ``sql.population`` file, both queries may read the population as a table named
``population``. Snapshots are immutable and content-addressed: the file name is the sha256 of its
bytes, so the same warehouse history always yields the same file and hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import files, keys
from pipeline.core.errors import DataError, SourceError, plain
from pipeline.stages import windows
from pipeline.store import db

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 65_536
# A night's features are read in two parts at once, the keys below the kept blocks' middle
# key and the rest, each in a session of its own (each with the blocks): PostgreSQL does
# not scan temporary tables in parallel workers.
PARTS = ("below", "from")


@dataclass(frozen=True)
class Snapshot:
    """An immutable Parquet file of features (and labels, for training) as of a date."""

    use_case: str
    as_of: date
    path: Path
    sha256: str
    rows: int
    labelled: bool
    # how each kept window was made tonight (``windows.Built``), for the night's record
    windows: tuple[str, ...] = ()

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
    return as_of + timedelta(days=uc.label.horizon_days)


def query(uc: UseCase, role: str, *, inline_windows: bool = True, part: str = "") -> str:
    """The text of the use case's ``sql.<role>`` file, ready to run.

    Features come ordered by the entity key (stable snapshot bytes); ``part``: only the
    keys ``< :split`` (``"below"``) or ``>= :split`` (``"from"``). With a population
    file, it is provided to the query as a CTE named ``population``. The use case's
    ``windows`` are provided to the features query as CTEs computed from the facts, unless
    ``inline_windows`` is false (they are then temporary tables: :mod:`pipeline.stages.windows`).
    """
    path = getattr(uc.sql, role)
    text = db.statement(path.read_text())
    key = f"features.{db.quote_ident(uc.entity_key)}"
    ctes = []
    if role == "features":
        where = {"": "", "below": f" WHERE {key} < :split", "from": f" WHERE {key} >= :split"}
        text = f"SELECT * FROM (\n{text}\n) AS features{where[part]} ORDER BY {key}"
        if inline_windows:
            ctes += windows.inline(uc)
    if uc.sql.population is not None and role in ("features", "labels"):
        ctes.append(f"population AS (\n{db.statement(uc.sql.population.read_text())}\n)")
    return f"WITH {', '.join(ctes)}\n{text}" if ctes else text


@contextmanager
def _naming(path: Path, uc: UseCase) -> Iterator[None]:
    """Warehouse errors raised inside say which SQL file failed."""
    try:
        yield
    except SourceError as err:
        hint = ""
        if "'population' not found" in str(err) and uc.sql.population is None:
            hint = (
                "; the table `population` exists only when the use case names a population "
                "file (sql.population in usecase.yaml)"
            )
        raise SourceError(f"{path.name}: {err}{hint}") from err


GRID_EPOCH = date(1970, 1, 1)


def training_dates(uc: UseCase, run_date: date) -> tuple[list[date], list[date]]:
    """Snapshot dates for a model trained by the run scoring ``run_date``.

    The newest holdout is the newest snapshot whose label window closed before
    ``run_date``; ``training.holdout_snapshots`` > 1 adds the grid dates before it, so the
    gates weigh several matured dates of evidence. Training snapshots are older still, and
    their label windows close on or before the oldest holdout date, so no training label
    overlaps a holdout period (out-of-time).

    Training dates, and holdout dates but the newest, sit on a fixed calendar grid (every
    ``training.step_days`` days from 1970-01-01), not on dates sliding with the run: a
    labelled snapshot is built once, the first night its labels have matured, and reused
    by the nights after (:func:`training_snapshot`). Only the newest holdout moves with the
    run date.

    Returns:
        (training dates, oldest first; holdout dates, oldest first)
    """
    horizon = timedelta(days=uc.label.horizon_days)
    step = uc.training.step_days
    newest = run_date - horizon
    holdouts = [newest]
    if uc.training.holdout_snapshots > 1:
        first = _on_grid(newest - timedelta(days=1), step)
        holdouts += [
            first - timedelta(days=i * step) for i in range(uc.training.holdout_snapshots - 1)
        ]
    newest_train = _on_grid(min(holdouts) - horizon, step)
    dates = [newest_train - timedelta(days=i * step) for i in range(uc.training.snapshots)]
    return sorted(dates), sorted(holdouts)


def _on_grid(day: date, step: int) -> date:
    """The newest date of the training grid on or before ``day``."""
    return day - timedelta(days=(day - GRID_EPOCH).days % step)


def definition_sha(uc: UseCase) -> str:
    """The hash of what a labelled snapshot is made of: the feature, label and population
    queries and the label horizon. A reused snapshot must have been built by the same."""
    digest = hashlib.sha256(f"horizon={uc.label.horizon_days}\n".encode())
    for role in ("features", "labels"):
        digest.update(query(uc, role).encode())
    digest.update(windows.definition(uc).encode())
    return digest.hexdigest()


def training_snapshot(
    settings: Settings, uc: UseCase, as_of: date, known_through: date
) -> tuple[Snapshot, bool]:
    """The labelled snapshot as of ``as_of``: the one built by an earlier night if the same
    queries made it (its content hash checked), else built now. Returns (snapshot, reused).

    A matured label window no longer changes, so a snapshot built once stands for every
    later night; the history check of ``check_sources`` (``history_unchanged``) stops a night
    whose warehouse rewrote the past those snapshots were built from.
    """
    folder = _training_dir(settings, uc, as_of)
    found = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    for path in found:
        sha = files.sha256(path)
        if path.stem == sha[:16]:
            rows = pq.ParquetFile(path).metadata.num_rows
            log.info(
                "snapshot %s as of %s: reused (%d rows, sha256 %s)", uc.name, as_of, rows, sha[:16]
            )
            return Snapshot(uc.name, as_of, path, sha, rows, True), True
        log.warning("snapshot %s does not match its content hash %s: rebuilding", path, sha[:16])
        path.unlink()
    snap = build_snapshot(settings, uc, as_of, labelled=True, known_through=known_through)
    return snap, False


def _training_dir(settings: Settings, uc: UseCase, as_of: date) -> Path:
    return settings.snapshots / uc.name / "training" / f"as_of={as_of}" / definition_sha(uc)[:12]


def _feature_schema(schema: pa.Schema, uc: UseCase) -> pa.Schema:
    """The snapshot's schema: the driver's without metadata, the key in its declared type,
    numbers as numbers and text as text (see :func:`_feature_type`)."""
    if uc.entity_key not in schema.names:
        raise DataError(
            f"the features query ({uc.sql.features}) returns no {uc.entity_key!r} column "
            f"(entity.key); it returns: {', '.join(schema.names)}"
        )
    fields = [
        pa.field(f.name, keys.arrow_type(uc.entity.type), False)
        if f.name == uc.entity_key
        else pa.field(f.name, _feature_type(f, uc), True)
        for f in schema
    ]
    return pa.schema(fields)


def _storage(t: pa.DataType) -> pa.DataType:
    return t.storage_type if isinstance(t, pa.ExtensionType) else t


def _feature_type(f: pa.Field, uc: UseCase) -> pa.DataType:
    """What a feature column is stored as: integers, floats and booleans as they come;
    PostgreSQL ``numeric`` (which the driver hands over as text) and decimals as float64;
    other text as string (a category). Dates and times are refused: a model takes numbers."""
    t = f.type
    type_name = str(getattr(t, "type_name", "") or "")
    if type_name == "numeric" or pa.types.is_decimal(t) or pa.types.is_null(t):
        return pa.float64()
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return t
    if pa.types.is_temporal(t):
        raise DataError(
            f"feature {f.name!r} of {uc.sql.features.name} is a {t} column; models take numbers "
            f"and text: turn it into a number in the SQL, e.g. CAST(:as_of AS date) - "
            f"CAST({f.name} AS date) AS days_since_{f.name}"
        )
    if pa.types.is_string(_storage(t)) or pa.types.is_large_string(_storage(t)):
        return pa.string()
    raise DataError(
        f"feature {f.name!r} of {uc.sql.features.name} has type {t}, which a model cannot take; "
        "cast it to a number or to text in the SQL"
    )


def _conform(column: pa.Array, target: pa.DataType) -> pa.Array:
    if column.type == target:
        return column
    if isinstance(column.type, pa.ExtensionType):
        column = column.storage
    return column.cast(target)


def _rebatch(
    reader: pa.RecordBatchReader, schema: pa.Schema, size: int, uc: UseCase
) -> Iterator[pa.Table]:
    """Fixed-size chunks whatever batch sizes the driver chose (stable Parquet bytes)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    k = schema.get_field_index(uc.entity_key)
    for batch in reader:
        columns = [_conform(c, f.type) for c, f in zip(batch.columns, schema, strict=True)]
        columns[k] = keys.conform(batch.column(k), uc.entity.type, uc.entity_key)
        batch = pa.RecordBatch.from_arrays(columns, schema=schema)
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


def build_snapshot(
    settings: Settings,
    uc: UseCase,
    as_of: date,
    *,
    labelled: bool = False,
    known_through: date | None = None,
    seen: windows.Seen | None = None,
) -> Snapshot:
    """Compute the features as of ``as_of`` in the warehouse and write them to Parquet.

    Args:
        as_of: features use facts dated strictly before this day.
        labelled: also attach the label ([as_of, as_of + horizon)).
        known_through: the run's own date; labels must have matured before it.
        seen: what the night's source checks counted per day of each table (rows and
            content): the kept blocks' evidence, not counted again (``windows.prepare``).

    Raises:
        DataError: labels not matured yet, the population is empty, or the label query
            does not give one 0/1 label to each entity of the features query.
        SourceError: the warehouse or a source table is missing.
    """
    end = label_end(uc, as_of)
    if labelled and known_through is not None and end > known_through:
        raise DataError(
            f"labels for {uc.name} as of {as_of} mature on {end} but the run only knows "
            f"facts before {known_through}; use an earlier snapshot date"
        )
    labels = read_labels(settings, uc, as_of) if labelled else None
    target_dir = (
        _training_dir(settings, uc, as_of)
        if labelled
        else settings.snapshots / uc.name / "features" / f"as_of={as_of}"
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    files.sweep(target_dir)
    tmp = files.temporary(target_dir / "snapshot.parquet")
    rows = 0
    kept = bool(uc.windows or uc.states) and windows.can_keep(settings.warehouse_url)
    built: list[windows.Built] = []

    def prepare(curs: list[Any]) -> list[tuple[str, dict[str, Any]]]:
        """The blocks in each session; the query of each: the keys below the first kept
        block's middle key in one, the rest in the other, both at once (PostgreSQL runs a
        query reading temporary tables in one process)."""
        for cur in curs:
            db.apply_settings(cur, uc.warehouse.settings, f"{uc.source}: warehouse.session")
        whole = [(query(uc, "features", inline_windows=not kept), {"as_of": as_of})]
        if not kept:
            return whole
        made = windows.prepare(
            curs[0], settings, uc, as_of, keep=not labelled, seen=seen, also=curs[1:]
        )
        built.extend(made.built)
        if len(curs) == 1 or made.middle is None:
            return whole
        params = {"as_of": as_of, "split": made.middle}
        return [(query(uc, "features", inline_windows=False, part=p), params) for p in PARTS]

    sessions = len(PARTS) if kept and not labelled else 1
    with (
        _naming(uc.sql.features, uc),
        db.arrow_readers(
            settings.warehouse_url, sessions, settings.warehouse_schema, prepare
        ) as reader,
    ):
        feature_schema = _feature_schema(reader.schema, uc)
        schema = feature_schema
        if labels is not None:
            schema = schema.append(pa.field("label", pa.int32()))
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            for chunk in _rebatch(reader, feature_schema, ROW_GROUP_ROWS, uc):
                if labels is not None:
                    chunk = labels.attach(chunk, uc, as_of)
                writer.write_table(chunk, row_group_size=ROW_GROUP_ROWS)
                rows += chunk.num_rows
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        writer.close()
    if rows == 0:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"empty population: the features query of {uc.name} ({uc.sql.features.name}) returns "
            f"no {uc.entity_key} as of {as_of} in schema {settings.warehouse_schema!r} of the "
            f"warehouse ({settings.warehouse_source}); check that the warehouse holds facts "
            f"before {as_of} and that the date is right"
        )
    if labels is not None and len(labels.keys) != rows:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"the labels query of {uc.name} ({uc.sql.labels.name}) returns {len(labels.keys)} "
            f"rows as of {as_of}, the features query {rows}: both must select the same "
            "population, one row per entity (a population file shared by both makes sure)"
        )
    sha = files.sha256(tmp)
    path = target_dir / f"{sha[:16]}.parquet"
    os.replace(tmp, path)
    log.info("snapshot %s as of %s: %d rows, sha256 %s", uc.name, as_of, rows, sha[:16])
    return Snapshot(uc.name, as_of, path, sha, rows, labelled, tuple(b.describe() for b in built))


@dataclass(frozen=True)
class Labels:
    """The labels of one snapshot date: entity keys and their 0/1 outcome."""

    keys: np.ndarray
    values: np.ndarray

    def of(self, wanted: np.ndarray) -> np.ndarray:
        """The label of each of ``wanted`` (any order); keys outside the population count as 0."""
        values, found = keys.lookup(self.keys, self.values, wanted)
        return np.where(found, values, 0).astype(np.int64)

    def attach(self, chunk: pa.Table, uc: UseCase, as_of: date) -> pa.Table:
        """``chunk`` with a ``label`` column; every entity must have exactly one label."""
        wanted = keys.to_numpy(chunk.column(uc.entity_key))
        values, found = keys.lookup(self.keys, self.values, wanted)
        if not found.all():
            example = wanted[~found][0]
            raise DataError(
                f"the labels query of {uc.name} ({uc.sql.labels.name}) has no row for "
                f"{uc.entity_key} {plain(example)} ({int((~found).sum())} of this batch) as of "
                f"{as_of}, though the features query selects it: both must select the same "
                "population"
            )
        return chunk.append_column("label", pa.array(values.astype(np.int32)))


def read_labels(settings: Settings, uc: UseCase, as_of: date) -> Labels:
    """The labels of the population as of ``as_of``: outcome in [as_of, as_of + horizon).

    Only meaningful once the window has closed (``label_end``).

    Raises:
        DataError: no ``label`` column, labels not 0/1, or an entity labelled twice.
    """
    with _naming(uc.sql.labels, uc):
        table = db.read_arrow(
            settings.warehouse_url,
            query(uc, "labels"),
            {"as_of": as_of, "label_end": label_end(uc, as_of)},
            schema=settings.warehouse_schema,
        )
    where = f"the labels query of {uc.name} ({uc.sql.labels.name}) as of {as_of}"
    missing = {uc.entity_key, "label"} - set(table.column_names)
    if missing:
        raise DataError(
            f"{where} should return the columns {uc.entity_key} and label, found "
            f"{', '.join(table.column_names)}"
        )
    key = keys.to_numpy(keys.conform(table.column(uc.entity_key), uc.entity.type, uc.entity_key))
    label = table.column("label")
    if label.null_count or not (pa.types.is_integer(label.type) or pa.types.is_boolean(label.type)):
        raise DataError(
            f"{where}: label should be a non-null 0/1 integer (or boolean), found type "
            f"{label.type} with {label.null_count} NULLs"
        )
    values = label.cast(pa.int64()).to_numpy()
    if len(values) and not np.isin(values, (0, 1)).all():
        raise DataError(f"{where}: label should be 0 or 1, found {plain(np.unique(values)[:5])}")
    distinct, rows = np.unique(key, return_counts=True)
    if len(distinct) != len(key):
        twice = distinct[rows > 1]
        raise DataError(
            f"{where} labels {len(twice):,} {uc.entity_key} more than once (first: "
            f"{plain(twice[:5])}); one row per entity"
        )
    return Labels(key, values)


def read_snapshot(snapshot: Snapshot, columns: list[str] | None = None) -> pa.Table:
    """Read a snapshot (all columns, or only ``columns``), verifying its content hash first."""
    verify(snapshot)
    return pq.read_table(snapshot.path, columns=columns)


HOLDOUT_DATE = "holdout_as_of"  # the column saying which pooled holdout date a row is from


def read_pooled(snapshots: list[Snapshot]) -> pa.Table:
    """Labelled snapshots stacked into one table, each row with its snapshot's date in a
    ``holdout_as_of`` column (the same entity appears once per date). Hashes verified."""
    tables = []
    for snap in snapshots:
        table = read_snapshot(snap)
        when = pa.array(np.full(table.num_rows, snap.as_of), type=pa.date32())
        tables.append(table.append_column(HOLDOUT_DATE, when))
    return pa.concat_tables(tables, promote_options="permissive")


def verify(snapshot: Snapshot) -> None:
    found = files.sha256(snapshot.path) if snapshot.path.exists() else "missing file"
    if found != snapshot.sha256:
        raise DataError(
            f"snapshot {snapshot.path} should have sha256 {snapshot.sha256[:16]}, found "
            f"{found[:16]}; snapshots are immutable: rebuild it with build_features"
        )


def feature_columns(schema: pa.Schema, uc: UseCase) -> list[str]:
    return [n for n in schema.names if n not in (uc.entity_key, "label", HOLDOUT_DATE)]


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
