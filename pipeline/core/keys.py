"""Entity keys of either type a use case may declare: ``bigint`` or ``text``.

Integer keys travel as int64 arrays, text keys as numpy object arrays of ``str``. Both
hash stably to 64 bits: integers by their two's-complement bits, text by SipHash-2-4 of
its UTF-8 bytes under a fixed key (``pandas.util.hash_array``, unchanged since pandas
0.20), so hash partitions and the campaign's control group depend on nothing but the key.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline.core.errors import DataError

_SIPHASH_KEY = "nightscore-keys!"  # 16 bytes; changing it moves every text key's hash


def arrow_type(key_type: str) -> pa.DataType:
    """The Arrow type of a key column: int64 for ``bigint``, string for ``text``."""
    return pa.int64() if key_type == "bigint" else pa.string()


def conform(
    column: pa.Array | pa.ChunkedArray, key_type: str, name: str
) -> pa.Array | pa.ChunkedArray:
    """The key column cast to its declared type (any integer to int64, any string to string).

    Raises:
        DataError: the column's type does not fit the declared key type.
    """
    t = column.type
    fits = (
        pa.types.is_integer(t)
        if key_type == "bigint"
        else (pa.types.is_string(t) or pa.types.is_large_string(t))
    )
    if not fits:
        raise DataError(
            f"entity key column {name!r} should be {key_type} (entity.type in usecase.yaml), "
            f"found {t}: cast it in the SQL (CAST({name} AS {key_type})) or change entity.type"
        )
    if column.null_count:
        raise DataError(
            f"entity key column {name!r} has {column.null_count} NULL values; every row needs a key"
        )
    return column.cast(arrow_type(key_type))


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys as numpy: int64 for integer keys, an object array of ``str`` for text keys."""
    return np.asarray(column.to_numpy(zero_copy_only=False))


def hash64(keys: np.ndarray) -> np.ndarray:
    """A stable unsigned 64-bit hash of each key (see the module docstring)."""
    keys = np.asarray(keys)
    if keys.dtype.kind in "iu":
        return keys.astype(np.int64).astype(np.uint64)
    import pandas as pd

    return np.asarray(
        pd.util.hash_array(keys.astype(object), hash_key=_SIPHASH_KEY, categorize=False),
        dtype=np.uint64,
    )


def lookup(
    keys: np.ndarray, values: np.ndarray, wanted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``wanted``, the value of the same key in (``keys``, ``values``).

    Returns:
        (values, found): ``found`` marks the wanted keys present; where it is False the
        value is that of an arbitrary row (mask it).
    """
    if not len(keys):
        return np.zeros(len(wanted), dtype=values.dtype), np.zeros(len(wanted), dtype=bool)
    order = np.argsort(keys, kind="stable")
    pos = np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)
    idx = order[pos]
    found = keys[idx] == wanted
    return values[idx], np.asarray(found, dtype=bool)


_M1, _M2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)


def control_group(entity_keys: np.ndarray, salt: str, fraction: float) -> np.ndarray:
    """True for the keys in the permanent control group (about ``fraction`` of all keys).

    A salted splitmix64 of each key's 64-bit hash (``hash64``), read as a
    number in [0, 1): depends on nothing but the key and the salt, so membership never
    changes across runs, models or backfills.
    """
    salt64 = np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little"))
    z = hash64(entity_keys)
    with np.errstate(over="ignore"):
        z = z ^ salt64
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return np.asarray((z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction)
