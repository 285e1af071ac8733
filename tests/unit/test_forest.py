"""The fast predictor serves scikit-learn's probabilities to the bit, or scikit-learn serves.

Models are fitted by ``train.fit`` (the shape the nightly trains) on rows with missing
numbers, missing strings, a column with more categories than the encoder keeps (the rarest
grouped) and, at scoring, categories the fit never saw.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from pipeline.conf import usecase
from pipeline.stages import forest, score, train

UC = usecase.load("churn")
NUMBERS = [f"n{i}" for i in range(8)]
STRINGS = ["contract", "market", "handset"]
COLUMNS = STRINGS + NUMBERS
HANDSETS = np.array([f"h{i:03d}" for i in range(320)], dtype=object)  # > 254: a rare group


def rows(n: int, seed: int, unseen: float = 0.0) -> tuple[pa.Table, np.ndarray]:
    """``n`` rows; ``unseen``: the share of strings the fit never saw."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(NUMBERS)))
    x[rng.random(x.shape) < 0.08] = np.nan
    contract = rng.choice(np.array(["monthly", "annual", "two_year"], dtype=object), n)
    market = rng.choice(np.array(["GB", "DE", "PL", "FR"], dtype=object), n)
    handset = HANDSETS[np.minimum(rng.zipf(1.4, n) - 1, len(HANDSETS) - 1)]
    for strings in (contract, market, handset):
        strings[rng.random(n) < 0.04] = None
        strings[rng.random(n) < unseen] = "never-seen"
    signal = (
        np.nan_to_num(x[:, 0])
        + 0.8 * (contract == "monthly")
        + 0.6 * np.isin(handset, HANDSETS[5:40])
        - 0.5 * (market == "PL")
    )
    y = (signal + rng.normal(size=n) > 0.9).astype(np.int64)
    table = pa.table(
        {
            "contract": pa.array(contract, pa.string()),
            "market": pa.array(market, pa.string()),
            "handset": pa.array(handset, pa.string()),
            **{name: pa.array(x[:, i]) for i, name in enumerate(NUMBERS)},
        }
    )
    return table, y


def fitted(trees: int, estimator: str = "hist_gradient_boosting", leaves: int = 31) -> object:
    params = {"max_iter": trees, "max_leaf_nodes": leaves, "min_samples_leaf": 20}
    if estimator != "hist_gradient_boosting":
        params = {}
    uc = UC.model_copy(
        update={"model": UC.model.model_copy(update={"estimator": estimator, "params": params})}
    )
    table, y = rows(30_000, seed=1)
    return train.fit(uc, table, COLUMNS, y)


@pytest.fixture(scope="module")
def many_trees() -> object:
    return fitted(150)


@pytest.mark.parametrize(
    ("trees", "leaves", "method"),
    [
        (1, 31, "bitvectors"),
        (3, 31, "bitvectors"),
        (40, 31, "bitvectors"),
        (3, 64, "bitvectors"),  # every bit of the masks
        (8, 200, "walk"),
    ],
)
def test_the_fast_predictor_gives_scikit_learns_probabilities_to_the_bit(
    trees: int, leaves: int, method: str
) -> None:
    model = fitted(trees, leaves=leaves)
    fast = forest.compile_model(model, COLUMNS)
    assert fast.method == method  # more than 64 leaves in a tree: the walk serves
    trees_leaves = [len(forest._leaves_in_order(p.nodes)) for i in model[-1]._predictors for p in i]
    assert (
        max(trees_leaves) == min(leaves, 64) if method == "bitvectors" else max(trees_leaves) > 64
    )
    table, _ = rows(20_000, seed=2, unseen=0.03)
    expected = train.predict(model, table, COLUMNS)
    assert np.array_equal(fast.predict(table), expected)
    assert np.array_equal(fast.predict(table, threads=2), expected)


def test_the_encoded_matrix_is_what_the_pipeline_hands_its_trees(many_trees: object) -> None:
    table, _ = rows(5_000, seed=3, unseen=0.05)
    fast = forest.compile_model(many_trees, COLUMNS)
    expected = many_trees[:-1].transform(train.to_frame(table, COLUMNS))  # type: ignore[index]
    # the estimator re-encodes the categorical columns it was given; a fit on every code
    # leaves them as they are, and the trees then read the pipeline's own matrix
    found = fast.encode(table)
    assert found.shape == expected.shape
    assert np.array_equal(found, expected, equal_nan=True)
    handset = [c.name for c in fast.matrix].index("handset")
    assert np.isnan(found[:, handset]).any()  # unseen and missing handsets
    assert np.nanmax(found[:, handset]) == 253  # the rare ones grouped in the last code


def test_unseen_categories_one_row_and_a_batch_of_several_chunks(many_trees: object) -> None:
    fast = forest.compile_model(many_trees, COLUMNS)
    table, _ = rows(3_000, seed=4, unseen=0.5)
    chunked = pa.concat_tables([table.slice(0, 1000), rows(500, seed=8, unseen=0.3)[0]])
    for part in (table, table.slice(0, 1), table.slice(7, 2), chunked):
        assert np.array_equal(fast.predict(part), train.predict(many_trees, part, COLUMNS))


def test_string_codes_remembered_across_batches_and_past_the_memory_limit(
    many_trees: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = forest.compile_model(many_trees, COLUMNS)
    for seed in (10, 11):  # the second batch meets values the first did not
        part = rows(2_000, seed=seed, unseen=0.2)[0]
        assert np.array_equal(fast.predict(part), train.predict(many_trees, part, COLUMNS))
    assert len(fast.known["handset"]) > 50
    monkeypatch.setattr(forest, "KNOWN_VALUES", 10)  # each batch starts the memory again
    small = forest.compile_model(many_trees, COLUMNS)
    parts = [rows(2_000, seed=seed, unseen=0.2)[0] for seed in range(12, 18)]
    with ThreadPoolExecutor(2) as pool:  # partitions share a predictor, and its memory
        found = list(pool.map(small.predict, parts))
    for part, probabilities in zip(parts, found, strict=True):
        assert np.array_equal(probabilities, train.predict(many_trees, part, COLUMNS))
    assert len(small.known["handset"]) <= 320 + 2


def test_a_model_of_another_shape_is_served_by_scikit_learn_and_says_why() -> None:
    model = fitted(0, estimator="logistic_regression")
    fast, served = score.fast_predictor(model, COLUMNS, "v-logistic")
    assert fast is None
    assert served.name == "sklearn"
    assert served.fallback is not None and "LogisticRegression" in served.fallback
    with pytest.raises(forest.Unsupported, match="LogisticRegression"):
        forest.compile_model(model, COLUMNS)


def test_a_fast_predictor_that_disagrees_hands_the_partition_to_scikit_learn(
    many_trees: object, caplog: pytest.LogCaptureFixture
) -> None:
    table, _ = rows(6_000, seed=5)
    fast, served = score.fast_predictor(many_trees, COLUMNS, "v-good")
    assert fast is not None and served.name == "forest" and served.fallback is None
    ok = score.agreement(fast, many_trees, table, COLUMNS, "v-good")
    assert ok.name == "forest" and ok.checked_rows == score.CHECK_ROWS
    assert ok.max_abs_diff == 0.0

    assert fast.masks is not None
    shifted = dataclasses.replace(
        fast, masks=dataclasses.replace(fast.masks, baseline=fast.masks.baseline + 1e-6)
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.score"):
        bad = score.agreement(shifted, many_trees, table, COLUMNS, "v-shifted")
    assert bad.name == "sklearn"
    assert bad.max_abs_diff is not None and 1e-9 < bad.max_abs_diff < 1e-6
    assert bad.fallback is not None and "differs by" in bad.fallback
    assert "v-shifted" in caplog.text and "served by scikit-learn" in caplog.text


def test_a_fast_predictor_that_fails_hands_the_partition_to_scikit_learn(
    many_trees: object,
) -> None:
    table, _ = rows(1_000, seed=6)
    fast = forest.compile_model(many_trees, COLUMNS)
    broken = dataclasses.replace(fast, matrix=[*fast.matrix[:-1], forest.Column("gone", "number")])
    served = score.agreement(broken, many_trees, table, COLUMNS, "v-broken")
    assert served.name == "sklearn" and served.fallback is not None
    assert "failed on the check" in served.fallback


@pytest.mark.timeout(120)
def test_a_million_rows_agree_on_every_row() -> None:
    model = fitted(40)  # scikit-learn's scoring of a million rows is most of this test's time
    table, _ = rows(1_000_000, seed=7, unseen=0.01)
    fast = forest.compile_model(model, COLUMNS)
    with train.threads():
        expected = train.predict(model, table, COLUMNS)
    found = fast.predict(table, threads=train.thread_count())
    assert len(found) == 1_000_000
    assert float(np.max(np.abs(found - expected))) <= score.TOLERANCE
    assert np.array_equal(found, expected)
