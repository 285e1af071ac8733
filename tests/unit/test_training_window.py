from __future__ import annotations

import itertools
from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from pipeline.conf import usecase
from pipeline.stages.features import label_end, training_dates

CHURN = usecase.load("churn")


@given(
    st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)),
    st.integers(1, 12),
    st.integers(1, 60),
    st.integers(7, 90),
    st.integers(1, 4),
)
def test_no_label_window_reaches_past_the_holdout_or_the_run(
    run: date, n: int, step: int, horizon: int, holdouts: int
) -> None:
    uc = CHURN.evolve(
        {
            "training": {"snapshots": n, "step_days": step, "holdout_snapshots": holdouts},
            "label": {"horizon_days": horizon},
        }
    )
    train, held = training_dates(uc, run)
    assert len(train) == n and train == sorted(train)
    assert len(held) == holdouts == len(set(held)) and held == sorted(held)
    # the newest holdout's labels are known before the run starts; every holdout's by then
    assert label_end(uc, held[-1]) == run
    assert all(label_end(uc, d) <= run for d in held)
    # older holdout dates sit on the grid, a step apart
    assert all((d - date(1970, 1, 1)).days % step == 0 for d in held[:-1])
    assert all((b - a).days == step for a, b in itertools.pairwise(held[:-1]))
    # out-of-time: every training label window closes by the oldest holdout date
    assert all(label_end(uc, d) <= held[0] for d in train)
    # the newest training date is the newest grid date whose labels close by it
    assert label_end(uc, train[-1] + timedelta(days=step)) > held[0]
    # evenly spaced on the calendar grid, whatever the run date
    assert all((b - a).days == step for a, b in itertools.pairwise(train))
    assert all((d - date(1970, 1, 1)).days % step == 0 for d in train)
    # the history the window needs is at most what the use case says
    assert (run - train[0]).days <= uc.history_days()


@given(st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)), st.integers(1, 60))
def test_consecutive_nights_share_their_training_dates_but_one_at_most(
    run: date, step: int
) -> None:
    uc = CHURN.evolve({"training": {"step_days": step}})
    tonight, _ = training_dates(uc, run)
    tomorrow, _ = training_dates(uc, run + timedelta(days=1))
    # tomorrow needs at most one snapshot tonight did not: the grid date that just matured
    assert len(set(tomorrow) - set(tonight)) <= 1


def test_churn_window_for_a_known_date() -> None:
    train, holdouts = training_dates(CHURN, date(2025, 6, 1))
    assert holdouts == [date(2025, 5, 2)]
    # 2025-05-02 - 30 days = 2025-04-02, back to the 14-day grid from 1970-01-01
    assert train[-1] == date(2025, 3, 27)
    assert train[0] == date(2025, 3, 27) - timedelta(days=14 * 5)
    assert CHURN.history_days() == 143
