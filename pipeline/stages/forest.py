"""Score a fitted HistGradientBoosting pipeline without pandas or ``predict_proba``, to the bit.

scikit-learn's ``predict_proba`` on a :func:`pipeline.stages.train.build_model` pipeline turns
the Arrow batch into pandas, encodes every string through the OrdinalEncoder, then walks
each tree over all rows, one tree after the other. Here a batch goes from Arrow straight to
the encoded matrix (each string column's distinct values are encoded through the fitted
transformers themselves the first time they are met, then taken by index), and compiled
code (numba) scores every tree, in threads over row blocks: by bitvectors, 64 rows side by
side, when every tree has at most 64 leaves, else by walking each tree for a row
(:mod:`pipeline.stages.forest_kernel`). Both read the fitted
trees' own splits and make scikit-learn's decisions (missing values, category bitsets,
unknown categories); the leaves are summed in tree order from the baseline and the
probability is the model's own link, so the result is the same double ``predict_proba``
gives.

Only the shape ``build_model`` makes is served: a Pipeline of a ColumnTransformer
(OrdinalEncoder on string columns, numbers passed through) and a binary
HistGradientBoostingClassifier. :func:`compile_model` says why anything else is not.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_BLOCK = 2048  # rows a thread walks at a time
KNOWN_VALUES = 100_000  # string values whose codes a predictor remembers, per column


class Unsupported(Exception):
    """The model is not of the shape this predictor serves (the reason is the message)."""


@dataclass(frozen=True)
class Trees:
    """Every tree's nodes in one array (see :mod:`pipeline.stages.forest_kernel` for a node's
    two words; child and bitset indices are global), the roots in tree order."""

    roots: np.ndarray
    words: np.ndarray  # (nodes, 2) int64
    bitset: np.ndarray
    left_bits: np.ndarray
    known_bits: np.ndarray
    known_row: np.ndarray
    baseline: float

    @property
    def count(self) -> int:
        return len(self.roots)

    @property
    def numbers(self) -> np.ndarray:
        """The nodes' second words as doubles (thresholds, leaf values)."""
        return self.words.view(np.float64)

    def args(self) -> tuple[Any, ...]:
        """What ``forest_kernel.raw_sums`` reads besides the rows."""
        return (
            self.roots,
            self.words,
            self.numbers,
            self.bitset,
            self.left_bits,
            self.known_bits,
            self.known_row,
            self.baseline,
        )


@dataclass(frozen=True)
class Masks:
    """The model's splits as ``forest_kernel.bitvector_sums`` reads them, tree after tree:
    the numeric splits of tree t at ``split_bounds[t]:split_bounds[t + 1]``, each with its
    feature, threshold, the mask clearing its left subtree's leaves, and 1 if a missing
    value goes right; the categorical features tree t splits on at
    ``table_bounds[t]:table_bounds[t + 1]``, each with a table of 257 masks (per code, 256:
    missing), the AND of the masks of the tree's splits on that feature the code fails.
    ``leaf_values``: per tree, left to right."""

    split_bounds: np.ndarray
    split_feature: np.ndarray
    thresholds: np.ndarray
    split_mask: np.ndarray
    missing_right: np.ndarray
    table_bounds: np.ndarray
    table_feature: np.ndarray
    tables: np.ndarray
    leaf_values: np.ndarray
    lowest_bit: np.ndarray
    baseline: float

    def args(self) -> tuple[Any, ...]:
        """What ``forest_kernel.bitvector_sums`` reads besides the rows."""
        return (
            self.split_bounds,
            self.split_feature,
            self.thresholds,
            self.split_mask,
            self.missing_right,
            self.table_bounds,
            self.table_feature,
            self.tables,
            self.leaf_values,
            self.lowest_bit,
            self.baseline,
        )


@dataclass(frozen=True)
class Column:
    """One column of the matrix the trees read: where it comes from and how it is made."""

    name: str
    kind: str  # "string": encoded through the fitted transformers; "number": as float64


@dataclass(frozen=True)
class CompiledForest:
    """A fitted model made ready to score Arrow batches (see the module docstring)."""

    model: Any
    columns: list[str]  # the model's input features, as scoring passes them
    matrix: list[Column]  # the trees' feature order
    trees: Trees
    masks: Masks | None  # None: a tree has more than 64 leaves, and the walk serves
    walk: Callable[..., None]
    bitvectors: Callable[..., None]
    compile_seconds: float
    # string value -> code, per column, as the model encoded it (see ``_string_codes``)
    known: dict[str, dict[Any, float]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def method(self) -> str:
        return "walk" if self.masks is None else "bitvectors"

    def encode(self, table: pa.Table, order: Literal["C", "F"] = "C") -> np.ndarray:
        """The matrix the trees read for ``table``'s rows (float64; ``order`` "C": a row's
        values together, "F": a column's)."""
        n = table.num_rows
        x = np.empty((n, len(self.matrix)), dtype=np.float64, order=order)
        strings = [c.name for c in self.matrix if c.kind == "string"]
        codes = self._string_codes(table, strings)
        for j, col in enumerate(self.matrix):
            if col.kind == "string":
                x[:, j] = codes[col.name]
            else:
                values = pc.cast(table.column(col.name), pa.float64())
                x[:, j] = values.to_numpy() if values.null_count == 0 else _with_nan(values)
        return x

    def _string_codes(self, table: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
        """Each string column's values as the fitted transformers encode them: every row
        takes its value's code, and a value (or a missing one) goes through the model's own
        ``transform`` the first time this predictor meets it."""
        indices: dict[str, np.ndarray] = {}
        uniques: dict[str, list[Any]] = {}
        for name in names:
            # one array first: chunks encoded apart could each get a dictionary of their own
            encoded = pc.dictionary_encode(table.column(name).combine_chunks())
            uniques[name] = [*encoded.dictionary.to_pylist(), None]  # None: a missing value
            indices[name] = (
                encoded.indices.fill_null(len(uniques[name]) - 1)
                .to_numpy()
                .astype(np.intp, copy=False)
            )
        codes = self._codes_of(uniques)
        return {name: codes[name][indices[name]] for name in names}

    def _codes_of(self, values: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        """The code of each of ``values`` (per string column), as the model encodes it: a
        value not met before goes through the model's ``transform``, and is remembered (at
        most ``KNOWN_VALUES`` per column: past that, the column's memory starts again)."""
        mine: dict[str, dict[Any, float]] = {}  # this call's codes, per column
        new: dict[str, list[Any]] = {}
        for name, those in values.items():
            known = self.known.setdefault(name, {})
            if len(known) + len(those) > KNOWN_VALUES:
                known.clear()
            # each code read once: partitions in threads share the memory, and may clear it
            mine[name] = {v: code for v in those if (code := known.get(v)) is not None}
            new[name] = [v for v in those if v not in mine[name]]
        size = max((len(v) for v in new.values()), default=0)
        if size:
            import pandas as pd

            frame = pd.DataFrame(
                {
                    name: _padded(new[name], size)
                    if name in new
                    else np.zeros(size, dtype=np.float64)
                    for name in self.columns
                }
            )
            looked_up = _transformed(self.model, frame)
            position = {c.name: j for j, c in enumerate(self.matrix)}
            for name, those in new.items():
                codes = np.asarray(looked_up[: len(those), position[name]], dtype=np.float64)
                learned = dict(zip(those, codes.tolist(), strict=True))
                self.known[name].update(learned)
                mine[name].update(learned)
        return {
            name: np.array([mine[name][v] for v in those], dtype=np.float64)
            for name, those in values.items()
        }

    def raw(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """The sum of the leaves from the baseline, per row of the encoded matrix."""
        n = x.shape[0]
        out = np.empty(n, dtype=np.float64)
        if self.masks is None:
            kernel, args = self.walk, (*self.trees.args(), out)
        else:
            kernel, args = self.bitvectors, (*self.masks.args(), out)
        blocks = [(s, min(n, s + ROW_BLOCK)) for s in range(0, n, ROW_BLOCK)]
        threads = max(1, min(threads, len(blocks)))
        if threads == 1:
            kernel(x, 0, n, *args)
            return out
        # the kernels release the GIL: plain threads, each scoring contiguous row blocks
        share = -(-len(blocks) // threads)
        spans = [
            (blocks[i][0], blocks[min(len(blocks), i + share) - 1][1])
            for i in range(0, len(blocks), share)
        ]
        with ThreadPoolExecutor(len(spans), thread_name_prefix="forest") as pool:
            for done in [pool.submit(kernel, x, a, b, *args) for a, b in spans]:
                done.result()
        return out

    def predict(self, table: pa.Table, threads: int = 1) -> np.ndarray:
        """Probabilities of the positive class for ``table``'s rows (as ``train.predict``)."""
        raw = self.raw(self.encode(table, "C" if self.masks is None else "F"), threads)
        estimator = self.model[-1]
        return np.asarray(estimator._loss.predict_proba(raw.reshape(-1, 1))[:, 1], dtype=np.float64)


def _with_nan(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(values, np.nan).to_numpy(), dtype=np.float64)


def _padded(values: list[Any], size: int) -> np.ndarray:
    out = np.empty(size, dtype=object)
    out[:] = None
    out[: len(values)] = values
    return out


def _transformed(model: Any, frame: Any) -> np.ndarray:
    """``frame`` as the trees read it: the pipeline's preprocessing, then the estimator's
    own (HistGradientBoosting re-encodes categorical columns it was given as numbers)."""
    x = model[:-1].transform(frame)
    inner = getattr(model[-1], "_preprocessor", None)
    return np.asarray(x if inner is None else inner.transform(x), dtype=np.float64)


def supported_shape(model: Any, columns: list[str]) -> list[Column]:
    """The trees' feature order for ``model`` fed ``columns``.

    Raises:
        Unsupported: not a :func:`pipeline.stages.train.build_model` HistGradientBoosting pipeline.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    if not isinstance(model, Pipeline) or len(model.steps) != 2:
        raise Unsupported(f"{type(model).__name__} is not a two-step scikit-learn Pipeline")
    pre, est = model[0], model[-1]
    if type(est) is not HistGradientBoostingClassifier:
        raise Unsupported(f"the estimator is {type(est).__name__}")
    if est.n_trees_per_iteration_ != 1 or len(est.classes_) != 2:
        raise Unsupported("the classifier is not binary")
    if not isinstance(pre, ColumnTransformer):
        raise Unsupported(f"the preprocessing is {type(pre).__name__}")
    if list(getattr(pre, "feature_names_in_", [])) != list(columns):
        raise Unsupported("the preprocessing was fitted on other columns")
    # as configured: a fitted "passthrough" is a FunctionTransformer in transformers_
    given = {name: t for name, t, _ in pre.transformers} | {"remainder": pre.remainder}
    outer: list[Column] = []
    for name, transformer, cols in pre.transformers_:
        names = [columns[c] for c in cols] if np.asarray(cols).dtype.kind in "iu" else list(cols)
        if given.get(name) == "drop" or not names:
            continue
        if isinstance(transformer, OrdinalEncoder):
            outer += [Column(c, "string") for c in names]
        elif isinstance(given.get(name), str) and given[name] == "passthrough":
            outer += [Column(c, "number") for c in names]
        else:
            raise Unsupported(f"transformer {name!r} is {type(transformer).__name__}")
    if len(outer) != est.n_features_in_:
        raise Unsupported(f"{len(outer)} columns reach the trees, which read {est.n_features_in_}")
    categorical = getattr(est, "is_categorical_", None)
    if categorical is None:
        return outer
    categorical = np.asarray(categorical, dtype=bool)
    if getattr(est, "_preprocessor", None) is not None:
        # the estimator's own encoder puts its categorical columns first
        order = np.concatenate([np.flatnonzero(categorical), np.flatnonzero(~categorical)])
        matrix = [outer[i] for i in order]
        categorical = categorical[order]
    else:
        matrix = outer
    numbers_as_categories = [c.name for c, cat in zip(matrix, categorical, strict=True) if cat]
    numbers_as_categories = [n for n in numbers_as_categories if n not in _strings(matrix)]
    if numbers_as_categories:
        raise Unsupported(f"numeric columns split as categories: {numbers_as_categories}")
    return matrix


def _strings(matrix: list[Column]) -> set[str]:
    return {c.name for c in matrix if c.kind == "string"}


def flatten(model: Any) -> Trees:
    """The fitted estimator's trees as flat arrays (see :class:`Trees`)."""
    from pipeline.stages import forest_kernel as k

    est = model[-1]
    known_bits, f_idx_map = est._bin_mapper.make_known_categories_bitsets()
    predictors = [p for iteration in est._predictors for p in iteration]
    roots, parts, bits = [], [], []
    offset = bit_offset = 0
    for p in predictors:
        nodes = p.nodes
        roots.append(offset)
        parts.append((nodes, offset, bit_offset))
        bits.append(np.asarray(p.raw_left_cat_bitsets, dtype=np.uint32).reshape(-1, 8))
        offset += len(nodes)
        bit_offset += len(bits[-1])
    nodes = np.concatenate([n for n, _, _ in parts])
    if len(nodes) >= 1 << k.INDEX_BITS or est.n_features_in_ > 1 << k.FEATURE_BITS:
        raise Unsupported(f"{len(nodes)} nodes over {est.n_features_in_} features: too many")
    node_offset = np.concatenate([np.full(len(n), o, dtype=np.int64) for n, o, _ in parts])
    bits_offset = np.concatenate([np.full(len(n), b, dtype=np.int64) for n, _, b in parts])
    flags = (
        nodes["is_leaf"].astype(np.int64) * k.LEAF
        + nodes["missing_go_to_left"].astype(np.int64) * k.MISSING_LEFT
        + nodes["is_categorical"].astype(np.int64) * k.CATEGORICAL
    )
    leaf = nodes["is_leaf"].astype(bool)
    words = np.zeros((len(nodes), 2), dtype=np.int64)
    words[:, 0] = (
        np.where(leaf, 0, nodes["left"].astype(np.int64) + node_offset)
        | (np.where(leaf, 0, nodes["right"].astype(np.int64) + node_offset) << k.INDEX_BITS)
        | (np.where(leaf, 0, nodes["feature_idx"].astype(np.int64)) << 48)
        | (flags << 56)
    )
    words.view(np.float64)[:, 1] = np.where(leaf, nodes["value"], nodes["num_threshold"])
    return Trees(
        roots=np.asarray(roots, dtype=np.int64),
        words=words,
        bitset=nodes["bitset_idx"].astype(np.int64) + bits_offset,
        left_bits=np.concatenate(bits).astype(np.uint32),
        known_bits=(
            np.asarray(known_bits, dtype=np.uint32).reshape(-1, 8)
            if len(known_bits)
            else np.zeros((1, 8), dtype=np.uint32)
        ),
        known_row=np.asarray(f_idx_map, dtype=np.int64),
        baseline=float(np.asarray(est._baseline_prediction).reshape(-1)[0]),
    )


def bitvectors(model: Any) -> Masks | None:
    """The fitted estimator's splits as :class:`Masks`; None when a tree has more than 64
    leaves (a mask has 64 bits)."""
    from pipeline.stages import forest_kernel as k

    est = model[-1]
    known_bits, f_idx_map = est._bin_mapper.make_known_categories_bitsets()
    known_bits = np.asarray(known_bits, dtype=np.uint32).reshape(-1, 8)
    predictors = [p for iteration in est._predictors for p in iteration]
    numeric: list[tuple[int, float, int, bool]] = []  # feature, threshold, mask, nan right
    tables: list[tuple[int, np.ndarray]] = []  # feature, the masks per code
    split_bounds, table_bounds = [0], [0]
    leaf_values = np.zeros((len(predictors), 64), dtype=np.float64)
    for t, predictor in enumerate(predictors):
        nodes = predictor.nodes
        bits = np.asarray(predictor.raw_left_cat_bitsets, dtype=np.uint32).reshape(-1, 8)
        leaves = _leaves_in_order(nodes)
        if len(leaves) > 64:
            return None
        bit_of = {leaf: 1 << i for i, leaf in enumerate(leaves)}
        leaf_values[t, : len(leaves)] = nodes["value"][leaves]
        below = dict(bit_of)  # node -> the bits of the leaves under it
        for i in _inner_nodes_children_first(nodes):
            below[i] = below[int(nodes["left"][i])] | below[int(nodes["right"][i])]
        by_feature: dict[int, np.ndarray] = {}
        for node in np.flatnonzero(~nodes["is_leaf"].astype(bool)):
            mask = ~below[int(nodes["left"][node])] & (2**64 - 1)
            f, left = int(nodes["feature_idx"][node]), bool(nodes["missing_go_to_left"][node])
            if nodes["is_categorical"][node]:
                fails = _codes_failing(
                    bits[int(nodes["bitset_idx"][node])], known_bits, f_idx_map[f], left
                )
                masks = np.where(fails, np.uint64(mask), ~np.uint64(0))
                by_feature[f] = masks if f not in by_feature else by_feature[f] & masks
            else:
                numeric.append((f, float(nodes["num_threshold"][node]), mask, not left))
        tables += sorted(by_feature.items())
        split_bounds.append(len(numeric))
        table_bounds.append(len(tables))
    lowest_bit = np.zeros(64, dtype=np.int64)
    for i in range(64):
        lowest_bit[(((1 << i) * int(k.DE_BRUIJN)) & (2**64 - 1)) >> 58] = i
    return Masks(
        split_bounds=np.asarray(split_bounds, dtype=np.int64),
        split_feature=np.array([s[0] for s in numeric], dtype=np.int64),
        thresholds=np.array([s[1] for s in numeric], dtype=np.float64),
        split_mask=np.array([s[2] for s in numeric], dtype=np.uint64),
        missing_right=np.array([s[3] for s in numeric], dtype=np.uint64),
        table_bounds=np.asarray(table_bounds, dtype=np.int64),
        table_feature=np.array([f for f, _ in tables], dtype=np.int64),
        tables=(
            np.stack([m for _, m in tables])
            if tables
            else np.zeros((0, k.MISSING_CODE + 1), dtype=np.uint64)
        ),
        leaf_values=leaf_values,
        lowest_bit=lowest_bit,
        baseline=float(np.asarray(est._baseline_prediction).reshape(-1)[0]),
    )


def _codes_failing(
    left_bits: np.ndarray, known_bits: np.ndarray, known_row: int, missing_left: bool
) -> np.ndarray:
    """Per code 0..256 (256: missing), whether a categorical split sends it right: a code in
    the split's bitset goes left; a code the fit knew, right; an unknown code, and a missing
    value, where missing values go."""
    codes = np.arange(256)
    word, bit = codes >> 5, (codes & 31).astype(np.uint32)
    in_left = ((left_bits[word] >> bit) & 1).astype(bool)
    known = ((known_bits[known_row][word] >> bit) & 1).astype(bool)
    goes_left = in_left | (~known & missing_left)
    return np.append(~goes_left, not missing_left)


def _leaves_in_order(nodes: np.ndarray) -> list[int]:
    """The tree's leaves from left to right."""
    leaves, stack = [], [0]
    while stack:
        i = stack.pop()
        if nodes["is_leaf"][i]:
            leaves.append(i)
        else:
            stack += [int(nodes["right"][i]), int(nodes["left"][i])]
    return leaves


def _inner_nodes_children_first(nodes: np.ndarray) -> list[int]:
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        if not nodes["is_leaf"][i]:
            order.append(i)
            stack += [int(nodes["left"][i]), int(nodes["right"][i])]
    return order[::-1]  # every node after the nodes below it


def load_kernels(cache_dir: Path | None = None) -> tuple[Callable[..., None], Callable[..., None]]:
    """The walk and the bitvector kernels; numba caches their machine code under
    ``cache_dir`` (unless ``NUMBA_CACHE_DIR`` says where) so that later processes skip the
    compilation."""
    import numba

    if cache_dir is not None and not os.environ.get("NUMBA_CACHE_DIR"):
        config: Any = numba.config  # read when the kernel's module is first imported
        config.CACHE_DIR = str(cache_dir)
    from pipeline.stages import forest_kernel

    walk: Callable[..., None] = forest_kernel.raw_sums
    bits: Callable[..., None] = forest_kernel.bitvector_sums
    return walk, bits


def compile_model(model: Any, columns: list[str], cache_dir: Path | None = None) -> CompiledForest:
    """``model`` made ready to score; its kernel is compiled (or loaded from numba's cache)
    by a two-row call, timed with the model's preparation in ``compile_seconds``.

    Raises:
        Unsupported: the model's shape (the message says how).
        ImportError: numba is not installed.
    """
    matrix = supported_shape(model, columns)
    started = time.perf_counter()
    walk, bits = load_kernels(cache_dir)
    trees, masks = flatten(model), bitvectors(model)
    forest = CompiledForest(model, list(columns), matrix, trees, masks, walk, bits, 0.0)
    forest.raw(np.zeros((2, len(matrix)), dtype=np.float64))
    return dataclasses.replace(forest, compile_seconds=time.perf_counter() - started)
