from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stages.publish import risk_deciles
from pipeline.stages.score import partition_of


@pytest.mark.parametrize("partitions", [1, 2, 3, 8])
def test_partitions_cover_every_key_once_and_are_balanced(partitions: int) -> None:
    keys = np.arange(1, 100_001)
    parts = partition_of(keys, partitions)
    assert parts.min() == 0 and parts.max() == partitions - 1
    counts = np.bincount(parts, minlength=partitions)
    assert counts.sum() == len(keys)
    assert counts.min() > 0.95 * len(keys) / partitions


def test_partition_is_a_pure_function_of_the_key() -> None:
    keys = np.array([5, 17, 123456789, 2**40])
    assert (partition_of(keys, 4) == partition_of(keys[::-1], 4)[::-1]).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=500))
def test_deciles_are_ordered_by_probability(probs: list[float]) -> None:
    p = np.array(probs)
    keys = np.arange(len(p))
    d = risk_deciles(p, keys)
    assert d.min() >= 1 and d.max() <= 10
    # a higher probability never lands in a higher (less risky) decile
    order = np.lexsort((keys, -p))
    assert (np.diff(d[order]) >= 0).all()


def test_deciles_split_evenly_and_ties_break_by_key() -> None:
    p = np.full(1000, 0.5)
    keys = np.arange(1000)[::-1].copy()
    d = risk_deciles(p, keys)
    assert np.bincount(d)[1:].tolist() == [100] * 10
    assert d[keys == 0][0] == 1 and d[keys == 999][0] == 10
