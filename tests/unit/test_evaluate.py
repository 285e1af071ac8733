from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.stages import evaluate


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounding", [None, 1])
def test_roc_auc_matches_sklearn_including_ties(seed: int, rounding: int | None) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(2000) < 0.1
    p = rng.random(2000) * 0.5 + y * 0.2
    if rounding is not None:
        p = np.round(p, rounding)  # many ties
    assert evaluate.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_auc_single_class_is_nan() -> None:
    assert np.isnan(evaluate.roc_auc(np.zeros(10), np.linspace(0, 1, 10)))


def test_lift_of_a_perfect_ranking() -> None:
    y = np.array([1] * 10 + [0] * 90)
    p = np.linspace(1, 0, 100)
    # all positives sit in the top decile: precision 1.0 over a 10% base rate
    assert evaluate.lift(y, p, 0.1) == pytest.approx(10.0)
    assert evaluate.precision_at(y, p, 5) == 1.0


def test_lift_of_a_random_ranking_is_about_one() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(200_000) < 0.05
    assert evaluate.lift(y, rng.random(200_000), 0.1) == pytest.approx(1.0, abs=0.1)


def test_calibration_error_small_when_calibrated_large_when_not() -> None:
    rng = np.random.default_rng(4)
    p = rng.random(100_000)
    y = rng.random(100_000) < p
    assert evaluate.expected_calibration_error(y, p) < 0.01
    assert evaluate.expected_calibration_error(y, p * 0.5) > 0.2


def test_classification_metrics_has_the_recorded_set() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(1000) < 0.2
    p = np.clip(0.2 + 0.3 * y + rng.normal(0, 0.1, 1000), 0, 1)
    m = evaluate.classification_metrics(y, p, capacity=50)
    assert {
        "roc_auc",
        "pr_auc",
        "brier",
        "log_loss",
        "ece",
        "lift_top_decile",
        "precision_at_capacity",
    } <= set(m)
    assert 0.9 < m["roc_auc"] <= 1.0
