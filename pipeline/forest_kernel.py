"""The compiled tree walk of :mod:`pipeline.forest` (numba), kept apart so that importing
it is the one step that needs numba and its cache directory.

A node is one row of two 64-bit words, so a step of the walk reads one cache line: word 0
packs the left child (bits 0-23), the right child (24-47), the feature (48-55) and the
flags (56-63: leaf, missing values go left, split on a category); word 1, read as a
double, is the split threshold, or a leaf's value. The walk follows scikit-learn's
``_predictor.pyx`` (1.9) decision by decision and adds the leaves of each row in tree
order from the baseline, as ``HistGradientBoostingClassifier._raw_predict`` does, so the
sums are the same doubles.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

LEAF = 1
MISSING_LEFT = 2
CATEGORICAL = 4
INDEX_BITS = 24  # children: up to 16.7 million nodes in all trees
FEATURE_BITS = 8  # features: up to 256 columns


def _raw_sums(
    x: np.ndarray,
    start: int,
    stop: int,
    roots: np.ndarray,
    words: np.ndarray,
    numbers: np.ndarray,
    bitset: np.ndarray,
    left_bits: np.ndarray,
    known_bits: np.ndarray,
    known_row: np.ndarray,
    baseline: float,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    index = (1 << INDEX_BITS) - 1
    for i in range(start, stop):
        acc = 0.0
        acc += baseline
        for t in range(roots.shape[0]):
            node = roots[t]
            while True:
                word = words[node, 0]
                flags = word >> 56
                if flags & LEAF:
                    break
                feature = (word >> 48) & 255
                v = x[i, feature]
                missing_left = (flags & MISSING_LEFT) != 0
                if flags & CATEGORICAL:
                    if v != v or v < 0.0 or v >= 256.0:
                        go_left = missing_left  # missing, or outside the codes
                    else:
                        c = np.int64(v)
                        bit = np.uint32(1) << np.uint32(c & 31)
                        if left_bits[bitset[node], c >> 5] & bit:
                            go_left = True
                        elif known_bits[known_row[feature], c >> 5] & bit:
                            go_left = False
                        else:
                            go_left = missing_left  # a category unknown to the fit
                else:
                    go_left = (v <= numbers[node, 1]) or (missing_left and v != v)
                node = (word & index) if go_left else ((word >> INDEX_BITS) & index)
            acc += numbers[node, 1]
        out[i] = acc


def _compile() -> Any:
    try:
        return numba.njit(nogil=True, cache=True)(_raw_sums)
    except RuntimeError:  # no writable cache location: compile in every process
        return numba.njit(nogil=True)(_raw_sums)


raw_sums = _compile()
