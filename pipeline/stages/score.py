"""Score the population in hash partitions, streaming the snapshot in bounded batches.

Each partition is independent (an Airflow mapped task, or a worker): it reads the
feature snapshot batch by batch, keeps the rows whose entity hashes to it, applies the
pinned model and writes a Parquet part of (entity key, probability). Memory is bounded by
the batch size, whatever the population.

A HistGradientBoosting model is served by :mod:`pipeline.stages.forest` (the same probabilities
as scikit-learn's, several times faster) once it agrees with scikit-learn on a sample of
the partition's first rows; any difference, or a failure to build it, and scikit-learn
serves the partition. The part records which did, on how many rows it was checked and the
largest difference found.
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

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import files, keys
from pipeline.core.errors import DataError
from pipeline.stages import features, forest, train
from pipeline.store import registry

log = logging.getLogger(__name__)


# Rows of a partition's first batch scored by both predictors before the fast one serves;
# evenly spaced, so the check is the same on every attempt.
CHECK_ROWS = 4096
# The largest difference in probability the fast predictor may show (it is expected to show none).
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Predictor:
    """What served a partition: ``forest`` or ``sklearn``; the rows both scored and their
    largest absolute difference; ``fallback``: why scikit-learn served (None when it was
    not asked to); ``compile_seconds``: building the fast predictor in this process."""

    name: str = "sklearn"
    checked_rows: int = 0
    max_abs_diff: float | None = None
    fallback: str | None = None
    compile_seconds: float | None = None

    def as_info(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "checked_rows": self.checked_rows,
            "max_abs_diff": self.max_abs_diff,
            "fallback": self.fallback,
            "compile_seconds": self.compile_seconds,
        }


@dataclass(frozen=True)
class ScoredPart:
    partition: int
    path: Path
    rows: int
    predictor: Predictor = Predictor()

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


@dataclass(frozen=True)
class Loaded:
    """A model version ready to score: the fitted pipeline, its registry row and feature
    columns, and its fast predictor (None, with why in ``built``, when scikit-learn serves).
    Partitions scored in one process share it: the model is read and the fast predictor
    built once, and each partition still checks the two agree on its own first rows."""

    version: str
    model: Any
    mv: registry.ModelVersion
    columns: list[str]
    fast: forest.CompiledForest | None
    built: Predictor


def load(settings: Settings, uc: UseCase, model_version: str) -> Loaded:
    """Read ``model_version`` from the registry (its sha256 verified) and build its fast
    predictor, compiled code cached under the home's ``cache/numba``."""
    model, mv = registry.load_model(settings, uc.name, model_version)
    columns = [f["name"] for f in mv.feature_schema]
    fast, built = fast_predictor(model, columns, model_version, settings.home / "cache" / "numba")
    return Loaded(model_version, model, mv, columns, fast, built)


def score_partition(
    settings: Settings,
    uc: UseCase,
    snapshot: features.Snapshot,
    model_version: str,
    partition: int,
    partitions: int,
    run_id: str,
    loaded: Loaded | None = None,
) -> ScoredPart:
    """Score the snapshot rows of one hash partition with ``model_version`` (``loaded``:
    that version already read, when the process scores several partitions)."""
    features.verify(snapshot)
    if loaded is None or loaded.version != model_version:
        loaded = load(settings, uc, model_version)
    model, mv, columns = loaded.model, loaded.mv, loaded.columns
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
    fast, served = loaded.fast, loaded.built
    # partitions run side by side (mapped tasks, or the CLI's threads): each its share of cores
    share = min(partitions, train.cpu_allowance())
    with (
        train.threads(share=share),
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
            if fast is not None and served.checked_rows == 0:
                served = agreement(fast, model, table, columns, model_version)
                if served.fallback is not None:
                    fast = None
            if fast is not None:
                p = fast.predict(table, threads=train.thread_count(share))
            else:
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
        "%s %s partition %d/%d: %d rows scored with %s by %s",
        uc.name,
        snapshot.as_of,
        partition,
        partitions,
        rows,
        model_version,
        served.name,
    )
    return ScoredPart(partition, final, rows, served)


def fast_predictor(
    model: Any, columns: list[str], version: str, cache_dir: Path | None = None
) -> tuple[forest.CompiledForest | None, Predictor]:
    """The fast predictor of ``model`` (its compiled code cached under ``cache_dir``), or
    None and why scikit-learn serves it."""
    try:
        fast = forest.compile_model(model, columns, cache_dir)
    except forest.Unsupported as why:
        log.info("model %s is served by scikit-learn: %s", version, why)
        return None, Predictor(fallback=f"model shape: {why}")
    except Exception as err:  # numba missing or failing to compile: scikit-learn still serves
        log.warning(
            "model %s is served by scikit-learn: the fast predictor failed to build (%s: %s)",
            version,
            type(err).__name__,
            err,
        )
        return None, Predictor(fallback=f"build failed: {type(err).__name__}: {err}")
    return fast, Predictor("forest", compile_seconds=round(fast.compile_seconds, 3))


def agreement(
    fast: forest.CompiledForest,
    model: Any,
    table: pa.Table,
    columns: list[str],
    version: str,
    rows: int = CHECK_ROWS,
) -> Predictor:
    """Score up to ``rows`` evenly spaced rows of ``table`` with both predictors: the fast
    one serves if no probability differs by more than ``TOLERANCE``, else scikit-learn does
    (and the returned record says why)."""
    take = np.unique(np.linspace(0, table.num_rows - 1, min(rows, table.num_rows)).astype(np.int64))
    sample = table.take(pa.array(take))
    expected = train.predict(model, sample, columns)
    compiled = round(fast.compile_seconds, 3)
    try:
        found = fast.predict(sample)
    except Exception as err:
        log.warning(
            "model %s is served by scikit-learn: the fast predictor failed on %d rows (%s: %s)",
            version,
            len(take),
            type(err).__name__,
            err,
        )
        why = f"failed on the check: {type(err).__name__}: {err}"
        return Predictor("sklearn", len(take), None, why, compiled)
    diff = float(np.max(np.abs(found - expected), initial=0.0))
    if not diff <= TOLERANCE:  # NaN too
        log.warning(
            "model %s is served by scikit-learn: the fast predictor differs by up to %.3g on %d "
            "checked rows (tolerance %.0e)",
            version,
            diff,
            len(take),
            TOLERANCE,
        )
        why = f"differs by {diff:.3g} (> {TOLERANCE:.0e}) on {len(take)} rows"
        return Predictor("sklearn", len(take), diff, why, compiled)
    return Predictor("forest", len(take), diff, None, compiled)


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
