"""The compiled kernels of :mod:`pipeline.stages.forest` (numba), kept apart so that importing
them is the one step that needs numba and its cache directory.

``bitvector_sums`` (QuickScorer, Lucchese et al., SIGIR 2015, scored a block of rows at a
time as in its vectorized form) serves trees of up to 64 leaves: every tree keeps a 64-bit
set of the leaves a row can still reach, leaves numbered left to right; every split the
row fails (it goes right) clears the leaves of its left subtree, and the row's leaf in a
tree is the lowest bit left. A block of ``ROWS`` rows goes through the trees in order: each
numeric split of a tree is compared with the block's values of its feature side by side
(a missing value fails the splits that send missing values right), with no branch on the
data (such branches are what make a walk slow); each categorical feature a tree splits on is one lookup per row,
the row's code into a table of the masks of every split of that tree on that feature the
code fails. The leaves are added to each row in tree order from the baseline, as in the
walk.

``raw_sums`` walks each tree; it serves trees of more than 64 leaves. A node is one row of two 64-bit words, so a step of the walk reads one cache line: word 0
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


def _bitvector_sums(
    x: np.ndarray,
    start: int,
    stop: int,
    split_bounds: np.ndarray,
    split_feature: np.ndarray,
    thresholds: np.ndarray,
    split_mask: np.ndarray,
    missing_right: np.ndarray,
    table_bounds: np.ndarray,
    table_feature: np.ndarray,
    tables: np.ndarray,
    leaf_values: np.ndarray,
    lowest_bit: np.ndarray,
    baseline: float,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    features = x.shape[1]
    values = np.empty((features, ROWS), dtype=np.float64)  # the block's rows, a feature's together
    missing = np.empty((features, ROWS), dtype=np.uint64)  # 1: the value is missing
    codes = np.empty((features, ROWS), dtype=np.int64)  # as a category: MISSING_CODE if not one
    reachable = np.empty(ROWS, dtype=np.uint64)
    sums = np.empty(ROWS, dtype=np.float64)
    one = np.uint64(1)
    for first in range(start, stop, ROWS):
        n = min(ROWS, stop - first)
        for f in range(features):  # a column's values together: x is best in "F" order
            for r in range(n):
                v = x[first + r, f]
                values[f, r] = v
                missing[f, r] = np.uint64(v != v)
                # missing, or outside the codes: as a missing value (the last entry)
                codes[f, r] = MISSING_CODE if (v != v or v < 0.0 or v >= 256.0) else np.int64(v)
        for r in range(n):
            sums[r] = baseline
        for t in range(split_bounds.shape[0] - 1):
            for r in range(n):
                reachable[r] = ~np.uint64(0)
            for k in range(split_bounds[t], split_bounds[t + 1]):
                f = split_feature[k]
                threshold = thresholds[k]
                mask = split_mask[k]
                nan_right = missing_right[k]
                for r in range(n):  # no branch: the rows of the block side by side
                    fails = np.uint64(values[f, r] > threshold) | (missing[f, r] & nan_right)
                    reachable[r] &= mask | (fails - one)
            for k in range(table_bounds[t], table_bounds[t + 1]):
                f = table_feature[k]
                for r in range(n):
                    reachable[r] &= tables[k, codes[f, r]]
            for r in range(n):
                bits = reachable[r]
                lowest = bits & (~bits + one)
                sums[r] += leaf_values[t, lowest_bit[(lowest * DE_BRUIJN) >> np.uint64(58)]]
        for r in range(n):
            out[first + r] = sums[r]


ROWS = 64  # rows a bitvector pass scores side by side
MISSING_CODE = 256
DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)


def _compile(function: Any) -> Any:
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # no writable cache location: compile in every process
        return numba.njit(nogil=True)(function)


raw_sums = _compile(_raw_sums)
bitvector_sums = _compile(_bitvector_sums)
