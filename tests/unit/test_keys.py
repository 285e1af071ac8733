"""Entity keys of either type: stable 64-bit hashes, partitions and control groups."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import keys
from pipeline.core.errors import DataError
from pipeline.core.keys import control_group
from pipeline.stages.publish import risk_deciles
from pipeline.stages.score import partition_of

TEXT = np.array([f"ACC-{i:06d}" for i in range(1, 60_001)], dtype=object)


def test_text_keys_hash_as_their_bytes_and_the_hash_never_changes() -> None:
    # pinned: changing the hash would move every text key's partition and control group
    found = keys.hash64(np.array(["ACC-000001", "ACC-000002", ""], dtype=object))
    assert found.tolist() == [2243573489102763092, 10833714887926680829, 10246369965244969736]
    # integer keys hash by value, so partitions and control groups of bigint keys stay put
    assert keys.hash64(np.array([0, 7, 2**40])).tolist() == [0, 7, 2**40]


@pytest.mark.parametrize("partitions", [1, 2, 3, 8])
def test_text_key_partitions_cover_every_key_once_and_are_balanced(partitions: int) -> None:
    parts = partition_of(TEXT, partitions)
    counts = np.bincount(parts, minlength=partitions)
    assert counts.sum() == len(TEXT) and counts.min() > 0.95 * len(TEXT) / partitions


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=200, unique=True))
def test_partition_and_control_group_depend_on_the_key_alone(values: list[str]) -> None:
    k = np.array(values, dtype=object)
    order = np.random.default_rng(0).permutation(len(k))
    assert np.array_equal(partition_of(k, 4)[order], partition_of(k[order], 4))
    assert np.array_equal(
        control_group(k, "salt-v1", 0.2)[order], control_group(k[order], "salt-v1", 0.2)
    )


def test_text_control_group_is_about_the_fraction_and_salted() -> None:
    members = control_group(TEXT, "accounts-rescue-control-v1", 0.1)
    assert 0.09 < members.mean() < 0.11
    other = control_group(TEXT, "another-salt", 0.1)
    assert (members & other).sum() < members.sum() * 0.2


def test_deciles_break_ties_by_text_key() -> None:
    p = np.array([0.5, 0.5, 0.5, 0.1])
    k = np.array(["b", "a", "c", "d"], dtype=object)
    d = risk_deciles(p, k)
    assert d[1] <= d[0] <= d[2]


def test_a_key_column_of_the_wrong_type_or_with_nulls_is_refused_with_the_fix() -> None:
    assert keys.conform(pa.array([1, 2], pa.int32()), "bigint", "id").type == pa.int64()
    assert keys.conform(pa.array(["a"], pa.large_string()), "text", "id").type == pa.string()
    with pytest.raises(DataError, match=r"CAST\(id AS text\)"):
        keys.conform(pa.array([1, 2]), "text", "id")
    with pytest.raises(DataError, match="NULL"):
        keys.conform(pa.array([1, None]), "bigint", "id")


def test_keys_in_messages_print_as_plain_values() -> None:
    import datetime

    import pandas as pd

    from pipeline.core.errors import plain

    key = np.array([1761, 42])[0]
    assert repr(key) == "np.int64(1761)"  # what a message showed before
    message = f"no row for customer_id {plain(key)}; first: {plain(pd.Series([1761, 42]))}"
    assert message == "no row for customer_id 1761; first: 1761, 42"
    assert plain(np.array(["ACC-1", "ACC-2"], dtype=object)) == "ACC-1, ACC-2"
    assert plain(pa.chunked_array([[1761]])) == plain(pa.scalar(1761)) == "1761"
    assert (
        plain([datetime.date(2026, 1, 5), np.datetime64("2026-01-06")]) == "2026-01-05, 2026-01-06"
    )
    assert plain(pd.Series(pd.to_datetime(["2026-01-05"]))) == "2026-01-05"
