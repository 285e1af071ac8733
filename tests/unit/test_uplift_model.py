"""Uplift on a simulated randomized experiment whose true effect per row is known.

Churn risk rises with x1; the offer prevents a quarter of it where x2 > 0.5 and provokes
it ("sleeping dogs") where x2 < -1; x3 and the region carry no effect.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from pipeline.campaigns import uplift
from pipeline.campaigns.uplift import (
    TwoModel,
    auuc,
    bootstrap,
    compare,
    qini_coefficient,
    qini_curve,
)


@dataclass(frozen=True)
class Experiment:
    X: pd.DataFrame
    treated: np.ndarray
    y: np.ndarray
    true_uplift: np.ndarray  # P(churn | control) - P(churn | treated)
    base_risk: np.ndarray  # P(churn | control)


def experiment(n: int, seed: int, control_share: float = 0.15) -> Experiment:
    rng = np.random.default_rng(seed)
    x1, x2, x3 = rng.normal(size=(3, n))
    region = rng.choice(["north", "south", "east", "west"], size=n)
    base = 1 / (1 + np.exp(-(-1.0 + 1.2 * x1 + 0.3 * (region == "north"))))
    effect = np.where(x2 > 0.5, 0.25, np.where(x2 < -1, -0.15, 0.0))
    treated_risk = np.clip(base - effect, 0.01, 0.99)
    treated = rng.random(n) >= control_share
    y = (rng.random(n) < np.where(treated, treated_risk, base)).astype(np.int64)
    X = pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "region": region})
    return Experiment(X, treated, y, base - treated_risk, base)


@pytest.fixture(scope="module")
def holdout() -> Experiment:
    return experiment(20_000, seed=1)


@pytest.fixture(scope="module")
def model() -> TwoModel:
    train = experiment(20_000, seed=0)
    return uplift.fit_two_model(train.X, train.treated, train.y, seed=7)


def random_score(n: int, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def test_two_model_ranks_rows_by_their_true_uplift(model: TwoModel, holdout: Experiment) -> None:
    predicted = model.predict_uplift(holdout.X)
    # measured 0.74-0.79 over data seeds 0-2
    assert spearmanr(predicted, holdout.true_uplift).statistic > 0.6
    assert spearmanr(model.predict_risk(holdout.X), holdout.base_risk).statistic > 0.85
    assert qini_coefficient(predicted, holdout.treated, holdout.y) > 0.7 * qini_coefficient(
        holdout.true_uplift, holdout.treated, holdout.y
    )


def test_two_model_is_seeded_takes_text_columns_and_leaves_x_alone() -> None:
    data = experiment(4000, seed=2)
    before = data.X.copy()
    first = uplift.fit_two_model(data.X, data.treated, data.y, seed=3, params={"max_iter": 20})
    second = uplift.fit_two_model(data.X, data.treated, data.y, seed=3, params={"max_iter": 20})
    pd.testing.assert_frame_equal(data.X, before)
    assert first.categorical == ("region",)
    as_category = data.X.astype({"region": "category"})
    assert np.array_equal(first.predict_uplift(data.X), second.predict_uplift(as_category))


def test_two_model_pickles_to_the_same_bytes_whatever_the_threads() -> None:
    data = experiment(4000, seed=13)
    blobs = set()
    for threads in (1, 2):
        with threadpool_limits(threads):
            fitted = uplift.fit_two_model(
                data.X, data.treated, data.y, seed=3, params={"max_iter": 20}
            )
        blobs.add(pickle.dumps(fitted, protocol=5))
    assert len(blobs) == 1


def test_true_uplift_beats_random_and_risk_targeting(holdout: Experiment) -> None:
    h = holdout
    for other in (random_score(len(h.y)), h.base_risk):
        result = compare(h.true_uplift, other, h.treated, h.y, resamples=300, seed=5)
        assert result["difference"]["low"] > 0
        assert result["difference"]["estimate"] == pytest.approx(
            result["challenger"]["estimate"] - result["champion"]["estimate"]
        )
    assert auuc(h.true_uplift, h.treated, h.y) > auuc(random_score(len(h.y)), h.treated, h.y)


def test_random_targeting_interval_covers_zero(holdout: Experiment) -> None:
    h = holdout
    interval = bootstrap(
        qini_coefficient, random_score(len(h.y)), h.treated, h.y, resamples=1000, seed=5
    )
    assert interval["low"] < 0 < interval["high"]
    assert interval["low"] < interval["estimate"] < interval["high"]


def test_qini_curve_runs_from_the_origin_to_the_overall_gain(holdout: Experiment) -> None:
    h = holdout
    fraction, gain = qini_curve(h.true_uplift, h.treated, h.y)
    treated_rows = h.treated.sum()
    overall = treated_rows * (h.y[~h.treated].mean() - h.y[h.treated].mean())
    assert (fraction[0], gain[0]) == (0.0, 0.0)
    assert fraction[-1] == 1.0
    assert gain[-1] == pytest.approx(overall, rel=1e-12)
    assert (np.diff(fraction) > 0).all()


def test_reversing_a_score_flips_its_qini_around_random(holdout: Experiment) -> None:
    h = holdout
    forward = qini_coefficient(h.true_uplift, h.treated, h.y)
    backward = qini_coefficient(-h.true_uplift, h.treated, h.y)
    assert forward > 0.01
    assert backward == pytest.approx(-forward, rel=0.05)


def test_uplift_at_the_top_and_bottom(holdout: Experiment) -> None:
    h = holdout
    everyone = h.y[~h.treated].mean() - h.y[h.treated].mean()
    assert uplift.uplift_at(h.true_uplift, h.treated, h.y, 1.0) == pytest.approx(everyone)
    assert uplift.uplift_at(h.true_uplift, h.treated, h.y, 0.2) > 0.15 > everyone
    assert uplift.uplift_at(-h.true_uplift, h.treated, h.y, 0.1) < 0  # the sleeping dogs
    with pytest.raises(ValueError, match="fraction"):
        uplift.uplift_at(h.true_uplift, h.treated, h.y, 0.0)


def test_metrics_match_their_definitions_row_by_row() -> None:
    rng = np.random.default_rng(4)
    n = 400
    score, treated, y = rng.random(n), rng.random(n) < 0.7, rng.random(n) < 0.3
    order = np.argsort(-score)
    treated[order[:3]] = y[order[:3]] = True  # the top holds no control row yet: gain 0
    t, yy = treated[order], y[order]
    gain, curve = np.zeros(n + 1), np.zeros(n + 1)
    for k in range(1, n + 1):  # the definitions, one depth at a time
        n1, y1 = t[:k].sum(), (yy[:k] & t[:k]).sum()
        n0, y0 = k - n1, (yy[:k] & ~t[:k]).sum()
        gain[k] = y0 * n1 / n0 - y1 if n0 else 0.0
        curve[k] = (y0 / n0 - y1 / n1) * k if n0 and n1 else 0.0
    depth = np.arange(n + 1) / n
    fraction, got = qini_curve(score, treated, y)
    np.testing.assert_allclose(fraction, depth)
    np.testing.assert_allclose(got, gain, atol=1e-12)
    random_line = depth * gain[-1]
    assert qini_coefficient(score, treated, y) == pytest.approx(
        np.sum((gain - random_line)[1:] + (gain - random_line)[:-1]) / (2 * n) / n
    )
    assert auuc(score, treated, y) == pytest.approx(np.sum(curve[1:] + curve[:-1]) / (2 * n) / n)
    top = order[:100]
    assert uplift.uplift_at(score, treated, y, 0.25) == pytest.approx(
        y[top][~treated[top]].mean() - y[top][treated[top]].mean()
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 300),
    levels=st.integers(1, 6),
)
def test_ties_are_targeted_together_whatever_the_row_order(seed: int, n: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    score = rng.integers(0, levels, n).astype(np.float64)
    treated, y = rng.random(n) < 0.6, rng.random(n) < 0.4
    treated[:2] = [True, False]
    shuffled = rng.permutation(n)
    for metric in (qini_coefficient, auuc):
        assert metric(score, treated, y) == pytest.approx(
            metric(score[shuffled], treated[shuffled], y[shuffled]), abs=1e-12
        )
    fraction, gain = qini_curve(score, treated, y)
    assert len(fraction) == len(np.unique(score)) + 1
    assert (fraction[0], gain[0], fraction[-1]) == (0.0, 0.0, 1.0)
    if levels == 1:  # one tie group: targeting by the score is random targeting
        assert qini_coefficient(score, treated, y) == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_rows(holdout: Experiment) -> None:
    h = holdout
    widths = []
    for rows in (5000, 20_000):
        interval = bootstrap(
            qini_coefficient,
            h.true_uplift[:rows],
            h.treated[:rows],
            h.y[:rows],
            resamples=300,
            seed=9,
        )
        assert interval["low"] < interval["estimate"] < interval["high"]
        widths.append(interval["high"] - interval["low"])
    assert widths[1] < 0.7 * widths[0]  # about half: the width shrinks as 1 / sqrt(rows)


@pytest.mark.parametrize("metric", [qini_coefficient, auuc])
def test_vectorized_bootstrap_equals_one_call_per_resample(metric: uplift.Metric) -> None:
    data = experiment(1500, seed=6)
    score = np.round(data.true_uplift + random_score(1500, seed=2) * 0.1, 2)  # with ties
    fast = bootstrap(metric, score, data.treated, data.y, resamples=120, seed=4)
    slow = bootstrap(
        lambda s, t, y: metric(s, t, y), score, data.treated, data.y, resamples=120, seed=4
    )
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_resamples_each_arm_to_its_own_size() -> None:
    data = experiment(1000, seed=8)
    control_rows = float((~data.treated).sum())
    interval = bootstrap(
        lambda s, t, y: float((~t).sum()), data.base_risk, data.treated, data.y, resamples=50
    )
    assert interval == {"estimate": control_rows, "low": control_rows, "high": control_rows}


@pytest.mark.parametrize(
    ("control_rows", "control_positives", "message"),
    [(20, 10, "control: 20 rows, 10 with y=1"), (200, 3, "control: 200 rows, 3 with y=1")],
)
def test_fit_rejects_an_arm_too_small_to_learn_from(
    control_rows: int, control_positives: int, message: str
) -> None:
    data = experiment(3000, seed=10)
    treated = np.ones(3000, dtype=bool)
    treated[:control_rows] = False
    y = data.y.copy()
    y[:control_rows] = 0
    y[:control_positives] = 1
    with pytest.raises(ValueError, match=message):
        uplift.fit_two_model(data.X, treated, y, seed=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [({"n_estimators": 10}, "n_estimators"), ({"random_state": 1}, "random_state")],
)
def test_fit_rejects_parameters_the_classifier_does_not_take(
    params: dict[str, int], message: str
) -> None:
    data = experiment(1000, seed=12)
    with pytest.raises(ValueError, match=message):
        uplift.fit_two_model(data.X, data.treated, data.y, seed=0, params=params)


@pytest.mark.parametrize(
    ("treated", "y", "message"),
    [
        ([True, False, True], [0, 1], "y with one value per row"),
        ([True, False, True], [0, 2, 1], "y in"),
        ([1, 0, 5], [0, 1, 1], "treated in"),
    ],
)
def test_metrics_reject_malformed_inputs(treated: list[int], y: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qini_coefficient(np.array([0.3, 0.2, 0.1]), np.array(treated), np.array(y))


def test_the_effect_model_recovers_log_odds_shifts_from_few_outcomes() -> None:
    """Rare outcomes, a small control arm: the effect is a shift of the log-odds by plan
    (monthly persuaded, two-year provoked, annual indifferent), as in the simulated world.
    A model of the shift on top of the served risk learns it where a model per arm cannot."""
    rng = np.random.default_rng(5)
    n = 10_000
    plan = rng.choice(["monthly", "annual", "two_year"], size=n, p=[0.6, 0.25, 0.15])
    x1 = rng.normal(size=n)
    logit = -3.2 + 0.9 * x1 + 0.6 * (plan == "monthly")
    shift = np.select([plan == "monthly", plan == "two_year"], [-1.6, 0.8], 0.0)
    treated = rng.random(n) >= 0.2

    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))

    y = (rng.random(n) < sigmoid(logit + treated * shift)).astype(np.int64)
    X = pd.DataFrame({"x1": x1, "plan": plan})
    risk = sigmoid(logit)  # the risk model: right without the email
    true_uplift = sigmoid(logit) - sigmoid(logit + shift)
    assert y[~treated].sum() < 200  # few outcomes in control

    model = uplift.fit_effect_model(X, risk, treated, y)
    effect = model.effect(X)
    by_plan = {p: float(effect[plan == p].mean()) for p in ("monthly", "annual", "two_year")}
    assert by_plan["monthly"] < -0.8 and by_plan["two_year"] > 0.2, by_plan
    assert by_plan["monthly"] < by_plan["annual"] < by_plan["two_year"], by_plan
    predicted = model.predict_uplift(X, risk)
    effect_rho = spearmanr(predicted, true_uplift).statistic
    t_learner = uplift.fit_two_model(X, treated, y, seed=1).predict_uplift(X)
    assert effect_rho > 0.8 and effect_rho > spearmanr(t_learner, true_uplift).statistic
    with pytest.raises(ValueError, match="risk"):
        model.predict_uplift(X)
    # pickles to the same bytes (the policy's version is the hash of its artifact)
    again = uplift.fit_effect_model(X, risk, treated, y)
    assert pickle.dumps(model) == pickle.dumps(again)
