"""Score the population in hash partitions, streaming the snapshot in bounded batches.

Each partition is independent (an Airflow mapped task, or a worker): it reads the
feature snapshot batch by batch, keeps the rows whose entity hashes to it, applies the
pinned model and writes a Parquet part of (entity key, probability). Memory is bounded by
the batch size, whatever the population.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import features, files, keys, registry, train
from pipeline.config import Settings
from pipeline.errors import DataError
from pipeline.usecase import UseCase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredPart:
    partition: int
    path: Path
    rows: int

    def as_xcom(self) -> dict[str, Any]:
        return {"partition": self.partition, "path": str(self.path), "rows": self.rows}

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> ScoredPart:
        return cls(int(data["partition"]), Path(data["path"]), int(data["rows"]))


def partition_of(entity_keys: np.ndarray, partitions: int) -> np.ndarray:
    """Stable hash partition of keys (Knuth's multiplicative hash of the 64-bit key hash)."""
    with np.errstate(over="ignore"):
        mixed = (keys.hash64(entity_keys) * np.uint64(2654435761)) % np.uint64(2**32)
    return (mixed % np.uint64(partitions)).astype(np.int64)


def schema_problems(schema: pa.Schema, feature_schema: list[dict[str, str]]) -> list[str]:
    """What keeps a model with ``feature_schema`` from scoring data with ``schema``."""
    problems = []
    for f in feature_schema:
        if f["name"] not in schema.names:
            problems.append(f"{f['name']} missing")
        elif str(schema.field(f["name"]).type) != f["dtype"]:
            problems.append(
                f"{f['name']} is {schema.field(f['name']).type}, model expects {f['dtype']}"
            )
    return problems


def check_schema(
    schema: pa.Schema, feature_schema: list[dict[str, str]], version: str, snapshot: Path
) -> None:
    """The snapshot must provide every feature the model was trained on, with the same type."""
    problems = schema_problems(schema, feature_schema)
    if problems:
        raise DataError(
            f"feature snapshot {snapshot} does not match model {version}: {'; '.join(problems)}; "
            "retrain the model or fix the feature SQL"
        )


def score_partition(
    settings: Settings,
    uc: UseCase,
    snapshot: features.Snapshot,
    model_version: str,
    partition: int,
    partitions: int,
    run_id: str,
) -> ScoredPart:
    """Score the snapshot rows of one hash partition with ``model_version``."""
    features.verify(snapshot)
    model, mv = registry.load_model(settings, uc.name, model_version)
    columns = [f["name"] for f in mv.feature_schema]
    source = pq.ParquetFile(snapshot.path)
    check_schema(source.schema_arrow, mv.feature_schema, model_version, snapshot.path)
    out_dir = settings.scores / uc.name / snapshot.as_of.isoformat() / _safe(run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"part-{partition:04d}-of-{partitions:04d}.parquet"
    files.sweep(out_dir.parent, recursive=True)  # killed attempts of the date ran elsewhere
    tmp = files.temporary(final)
    schema = pa.schema(
        [
            (uc.entity_key, keys.arrow_type(uc.entity.type)),
            (uc.probability_column, pa.float64()),
        ]
    )
    rows = 0
    # partitions run side by side (mapped tasks, or the CLI's threads): each its share of cores
    with (
        train.threads(share=min(partitions, train.cpu_allowance())),
        pq.ParquetWriter(tmp, schema, compression="zstd") as writer,
    ):
        for batch in source.iter_batches(
            batch_size=uc.serving.batch_rows, columns=[uc.entity_key, *columns]
        ):
            table = pa.Table.from_batches([batch])
            mine = partition_of(keys.to_numpy(table.column(uc.entity_key)), partitions) == partition
            if not mine.any():
                continue
            table = table.filter(pa.array(mine))
            p = train.predict(model, table, columns)
            writer.write_table(
                pa.table(
                    {uc.entity_key: table.column(uc.entity_key), uc.probability_column: p},
                    schema=schema,
                )
            )
            rows += table.num_rows
    os.replace(tmp, final)
    log.info(
        "%s %s partition %d/%d: %d rows scored with %s",
        uc.name,
        snapshot.as_of,
        partition,
        partitions,
        rows,
        model_version,
    )
    return ScoredPart(partition, final, rows)


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
