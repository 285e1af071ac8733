from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from pipeline import usecase
from pipeline.features import label_end, training_dates

CHURN = usecase.load("churn")


@given(
    st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)),
    st.integers(1, 12),
    st.integers(1, 60),
    st.integers(7, 90),
)
def test_no_label_window_reaches_past_the_holdout_or_the_run(
    run: date, n: int, step: int, horizon: int
) -> None:
    uc = CHURN.evolve(
        {"training": {"snapshots": n, "step_days": step}, "label": {"horizon_days": horizon}}
    )
    train, holdout = training_dates(uc, run)
    assert len(train) == n and train == sorted(train)
    # the holdout's labels are known before the run starts
    assert label_end(uc, holdout) == run
    # out-of-time: every training label window closes by the holdout date
    assert all(label_end(uc, d) <= holdout for d in train)
    # the history the window needs is what the oldest snapshot needs
    assert (run - train[0]).days == uc.history_days()


def test_churn_window_for_a_known_date() -> None:
    train, holdout = training_dates(CHURN, date(2025, 6, 1))
    assert holdout == date(2025, 5, 2)
    assert train[-1] == date(2025, 4, 2)
    assert train[0] == date(2025, 4, 2) - timedelta(days=14 * 5)
    assert CHURN.history_days() == 130
