"""The campaign experiment's arithmetic: power, weeks needed and the pooled uplift."""

from __future__ import annotations

import math
from datetime import date, timedelta

import numpy as np

from pipeline.campaigns import experiment


def test_the_minimum_detectable_effect_is_the_textbook_one() -> None:
    # two groups of 1,000 at 50%: (1.960 + 0.842) * sqrt(0.25 * 2 / 1000)
    assert math.isclose(
        experiment.minimum_detectable_effect(1000, 1000, 0.5), 0.06265, rel_tol=1e-3
    )
    assert experiment.minimum_detectable_effect(1000, 0, 0.5) == math.inf
    # a bigger control group helps, and four times the data halves the effect
    assert experiment.minimum_detectable_effect(1000, 400, 0.1) < (
        experiment.minimum_detectable_effect(1000, 100, 0.1)
    )
    assert math.isclose(
        experiment.minimum_detectable_effect(4000, 400, 0.1),
        experiment.minimum_detectable_effect(1000, 100, 0.1) / 2,
    )


def test_weeks_needed_is_the_first_week_the_effect_becomes_detectable() -> None:
    for effect, n1, n0, base in [
        (0.03, 1000, 250, 0.12),
        (0.01, 1000, 53, 0.12),
        (0.05, 400, 100, 0.2),
    ]:
        weeks = experiment.weeks_needed(effect, n1, n0, base)
        assert weeks is not None
        assert experiment.minimum_detectable_effect(n1 * weeks, n0 * weeks, base) <= effect
        if weeks > 1:
            before = weeks - 1
            assert experiment.minimum_detectable_effect(n1 * before, n0 * before, base) > effect
    assert experiment.weeks_needed(0.03, 1000, 0, 0.12) is None


def test_the_plan_of_a_config() -> None:
    p = experiment.plan(1000, 0.2, 0.12, 0.03, 1, 8)
    assert p["control_per_week"] == 250
    assert p["mde"] < 0.03 and p["weeks_needed"] <= 8
    text = experiment.plan_text(p)
    assert "250" in text and "after 8 weeks" in text and f"needs {p['weeks_needed']} week" in text
    five_percent = experiment.plan(1000, 0.05, 0.12, 0.03, 1, 8)
    assert five_percent["mde"] > 0.03 and five_percent["weeks_needed"] > 8


def _row(day: date, n1: int, k1: int, n0: int, k0: int) -> dict:
    return {
        "score_date": day,
        "contacted": n1,
        "contacted_positives": k1,
        "control": n0,
        "control_positives": k0,
    }


def test_pooling_one_week_is_that_week_and_campaigns_of_a_week_are_one_cohort() -> None:
    monday = date(2026, 8, 24)
    one = experiment.pooled([_row(monday, 1000, 100, 250, 40)])
    assert one["weeks"] == 1 and math.isclose(one["uplift"], 0.16 - 0.10)
    half = 1.959964 * math.sqrt(0.16 * 0.84 / 250 + 0.1 * 0.9 / 1000)
    assert math.isclose(one["ci_high"] - one["uplift"], half, rel_tol=1e-5)
    split = experiment.pooled(
        [_row(monday, 500, 50, 125, 20), _row(monday + timedelta(days=3), 500, 50, 125, 20)]
    )
    assert split["weeks"] == 1 and math.isclose(split["uplift"], one["uplift"])
    two = experiment.pooled(
        [_row(monday, 1000, 100, 250, 40), _row(monday + timedelta(7), 1000, 100, 250, 40)]
    )
    assert two["weeks"] == 2 and math.isclose(two["uplift"], one["uplift"])
    assert math.isclose(
        (two["ci_high"] - two["ci_low"]) * math.sqrt(2), one["ci_high"] - one["ci_low"]
    )
    assert two["conclusive"] and "conclusive" in experiment.pooled_text(two)
    assert experiment.pooled([])["uplift"] is None


def test_the_pooled_interval_covers_the_true_uplift_about_95_times_in_100() -> None:
    """Weekly cohorts with different base rates (seasons) and one true uplift."""
    rng = np.random.default_rng(3)
    true_uplift, covered, trials = 0.03, 0, 2000
    monday = date(2026, 1, 5)
    for _ in range(trials):
        rows = []
        for w in range(6):
            base = 0.10 + 0.02 * (w % 3)
            n1, n0 = 1000, int(rng.integers(150, 300))
            k1 = int(rng.binomial(n1, base - true_uplift))
            k0 = int(rng.binomial(n0, base))
            rows.append(_row(monday + timedelta(weeks=w), n1, k1, n0, k0))
        p = experiment.pooled(rows)
        covered += p["ci_low"] <= true_uplift <= p["ci_high"]
    assert 0.93 <= covered / trials <= 0.97, covered / trials
