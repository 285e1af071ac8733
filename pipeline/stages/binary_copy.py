"""The night's scored rows as PostgreSQL binary COPY data, in key order, with their risk
deciles.

The deciles are global (decile 1 = the 10% highest probabilities, ties broken by key) yet
computed in bounded memory: ``decile_thresholds`` finds the (probability, key) where each
decile starts in two passes over the scored parts, and ``deciles_from_thresholds`` places
each row of a batch against them. ``key_ordered`` merges the parts, each written in key
order, into one ascending stream of batches; ``copy_rows`` encodes a batch in the binary
COPY format, columns as ``copy_columns`` lists them, between ``COPY_HEADER`` and
``COPY_TRAILER``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.stages.score import ScoredPart

HISTOGRAM_BINS = 1 << 16


def _part_batches(
    parts: list[ScoredPart], columns: list[str], rows: int
) -> Iterator[pa.RecordBatch]:
    """Batches of the parts, read one row group at a time (memory bounded by a row group)."""
    for part in parts:
        pf = pq.ParquetFile(part.path)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=columns, use_threads=False).to_batches(
                max_chunksize=rows
            )


def decile_thresholds(
    uc: UseCase, parts: list[ScoredPart], batch_rows: int
) -> list[tuple[float, Any]]:
    """The (probability, key) of the first row of deciles 2..10, in bounded memory.

    Rows are ranked by probability descending, then key ascending. Pass 1 counts rows per
    histogram bin of the probability; pass 2 keeps only the rows falling in the few bins
    that hold a decile boundary and sorts those. Memory is the batch plus those bins,
    whatever the population.
    """
    pcol, key = uc.probability_column, uc.entity_key
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    n = 0
    for batch in _part_batches(parts, [pcol], batch_rows):
        p = batch.column(0).to_numpy()
        counts += np.bincount(_bins(p), minlength=HISTOGRAM_BINS)
        n += len(p)
    if n == 0:
        return []
    # descending order: rank range of bin b is [above[b], above[b] + counts[b])
    above = np.cumsum(counts[::-1])[::-1] - counts
    boundaries = [-(-j * n // 10) for j in range(1, 10)]  # ceil(j * n / 10)
    wanted: dict[int, list[int]] = {}
    for r in boundaries:
        b = int(np.flatnonzero((above <= r) & (r < above + counts))[0])
        wanted.setdefault(b, []).append(r)
    keep_bins = np.array(sorted(wanted))
    probs, kept = [], []
    for batch in _part_batches(parts, [pcol, key], batch_rows):
        p = batch.column(0).to_numpy()
        mask = np.isin(_bins(p), keep_bins)
        probs.append(p[mask])
        kept.append(keys.to_numpy(batch.column(1))[mask])
    bp, bk = np.concatenate(probs), np.concatenate(kept)
    bb = _bins(bp)
    out = []
    for b in keep_bins:
        sel = bb == b
        order = np.lexsort((bk[sel], -bp[sel]))
        for r in wanted[int(b)]:
            i = order[r - int(above[b])]
            out.append(
                (float(bp[sel][i]), bk[sel][i].item() if bk.dtype.kind in "iu" else bk[sel][i])
            )
    return sorted(out, key=lambda t: (-t[0], t[1]))


def _bins(p: np.ndarray) -> np.ndarray:
    return np.minimum((np.asarray(p) * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)


def deciles_from_thresholds(
    p: np.ndarray, entity_keys: np.ndarray, thresholds: list[tuple[float, Any]]
) -> np.ndarray:
    """Decile of each row: 1 + the number of boundaries it sorts at or after."""
    d = np.ones(len(p), dtype=np.int16)
    for tp, tk in thresholds:
        d += ((p < tp) | ((p == tp) & (entity_keys >= tk))).astype(np.int16)
    return d


def key_ordered(
    parts: list[ScoredPart], columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The rows of the parts (key first in ``columns``), merged into ascending key order.

    Scoring writes each part in key order; merging them fills the staging heap in key order,
    so building the primary key finds its input sorted. Any input order still yields every
    row exactly once, only unsorted. Memory: one batch per part.
    """
    sources = [_part_batches([p], columns, batch_rows) for p in parts]
    buffers: list[pa.RecordBatch | None] = [None] * len(parts)
    exhausted = [False] * len(parts)
    while True:
        for i, source in enumerate(sources):
            while not exhausted[i] and _empty(buffers[i]):
                buffers[i] = next(source, None)
                exhausted[i] = buffers[i] is None
        live = [(i, b) for i, b in enumerate(buffers) if b is not None and b.num_rows]
        if not live:
            return
        # every buffered row up to the smallest buffer maximum: at least one buffer drains
        cutoff = min(pc.max(b.column(0)).as_py() for _, b in live)
        taken = []
        for i, b in live:
            mask = pc.less_equal(b.column(0), cutoff)
            taken.append(b.filter(mask))
            buffers[i] = b.filter(pc.invert(mask))
        merged = pa.Table.from_batches(taken).combine_chunks()
        yield from merged.take(pc.sort_indices(merged.column(0))).to_batches()


def _empty(batch: pa.RecordBatch | None) -> bool:
    return batch is None or batch.num_rows == 0


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension
COPY_TRAILER = b"\xff\xff"


def copy_columns(uc: UseCase) -> list[str]:
    """The staged columns in the order :func:`copy_rows` encodes them (the key last)."""
    return [
        "score_date",
        "model_version",
        uc.probability_column,
        "risk_decile",
        "control_group",
        uc.entity_key,
    ]


def copy_rows(
    score_date: date,
    model_version: str,
    entity_keys: pa.Array,
    probs: np.ndarray,
    deciles: np.ndarray,
    control: np.ndarray,
) -> bytes:
    """Rows in PostgreSQL's binary COPY format, columns as :func:`copy_columns` lists them.

    Vectorized: the fixed-width fields of all rows are one numpy record array (big-endian,
    each field after its length); a text key's bytes are appended to each record by Arrow.
    ``entity_keys`` holds no nulls (the caller checks).
    """
    n = len(entity_keys)
    version = model_version.encode()
    text = not pa.types.is_integer(entity_keys.type)
    fields = [
        ("fields", ">i2"),
        ("date_len", ">i4"),
        ("date", ">i4"),
        ("version_len", ">i4"),
        ("version", f"S{len(version)}"),
        ("prob_len", ">i4"),
        ("prob", ">f8"),
        ("decile_len", ">i4"),
        ("decile", ">i2"),
        ("control_len", ">i4"),
        ("control", "u1"),
        ("key_len", ">i4"),
    ]
    if not text:
        fields.append(("key", ">i8"))
    row = np.empty(n, dtype=np.dtype(fields))
    row["fields"] = 6
    row["date_len"], row["date"] = 4, (score_date - date(2000, 1, 1)).days
    row["version_len"], row["version"] = len(version), version
    row["prob_len"], row["prob"] = 8, probs
    row["decile_len"], row["decile"] = 2, deciles
    row["control_len"], row["control"] = 1, control
    if not text:
        row["key_len"], row["key"] = 8, keys.to_numpy(entity_keys)
        return row.tobytes()
    utf8 = entity_keys.cast(pa.binary())
    row["key_len"] = pc.binary_length(utf8).to_numpy(zero_copy_only=False)
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row.itemsize), n, [None, pa.py_buffer(row)]
    ).cast(pa.binary())
    joined = pc.binary_join_element_wise(fixed, utf8, b"")
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)
    first, last = int(offsets[joined.offset]), int(offsets[joined.offset + n])
    return joined.buffers()[2].to_pybytes()[first:last]
