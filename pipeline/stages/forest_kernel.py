"""The compiled kernels of :mod:`pipeline.stages.forest` (numba), kept apart so that importing
them is the one step that needs numba and its cache directory.

``bitvector_sums`` (QuickScorer, Lucchese et al., SIGIR 2015) serves trees of up to 64
leaves: every tree keeps a 64-bit set of the leaves a row can still reach, leaves numbered
left to right; every split the row fails (it goes right) clears the leaves of its left
subtree, and the row's leaf in a tree is the lowest bit left. The splits a row fails are
found per feature without walking: numeric splits sorted by threshold (those below the
row's value fail; a missing value fails those that send missing values right), and for a
categorical feature the splits each code fails, listed once per model. No branch depends
on the path through a tree, which is what makes a walk slow. The leaves are added in tree
order from the baseline, as in the walk.

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
    bounds: np.ndarray,
    thresholds: np.ndarray,
    split_tree: np.ndarray,
    split_mask: np.ndarray,
    missing_bounds: np.ndarray,
    missing_tree: np.ndarray,
    missing_mask: np.ndarray,
    categorical: np.ndarray,
    code_bounds: np.ndarray,
    code_tree: np.ndarray,
    code_mask: np.ndarray,
    leaf_values: np.ndarray,
    lowest_bit: np.ndarray,
    baseline: float,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    trees = leaf_values.shape[0]
    reachable = np.empty(trees, dtype=np.uint64)
    everything = ~np.uint64(0)
    for i in range(start, stop):
        reachable[:] = everything
        for f in range(bounds.shape[0] - 1):
            v = x[i, f]
            if v != v:
                for k in range(missing_bounds[f], missing_bounds[f + 1]):
                    reachable[missing_tree[k]] &= missing_mask[k]
            else:
                k = bounds[f]
                end = bounds[f + 1]
                while k < end and thresholds[k] < v:  # v > threshold: the split sends v right
                    reachable[split_tree[k]] &= split_mask[k]
                    k += 1
            if categorical[f]:
                # missing, or outside the codes: as a missing value (the last list)
                c = MISSING_CODE if (v != v or v < 0.0 or v >= 256.0) else np.int64(v)
                for k in range(code_bounds[f, c], code_bounds[f, c + 1]):
                    reachable[code_tree[k]] &= code_mask[k]
        acc = 0.0
        acc += baseline
        for t in range(trees):
            bits = reachable[t]
            lowest = bits & (~bits + np.uint64(1))
            acc += leaf_values[t, lowest_bit[(lowest * DE_BRUIJN) >> np.uint64(58)]]
        out[i] = acc


MISSING_CODE = 256
DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)


def _compile(function: Any) -> Any:
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # no writable cache location: compile in every process
        return numba.njit(nogil=True)(function)


raw_sums = _compile(_raw_sums)
bitvector_sums = _compile(_bitvector_sums)
