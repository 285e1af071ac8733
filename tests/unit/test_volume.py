"""The daily volume rule on rows per day: weekly rhythm, the calendar of low and high days,
counting noise, and messages printed to the digit that shows which side of a bound."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from pipeline.conf.contract import VolumeDays, VolumeSpec
from pipeline.stages.source_days import daily_volume, window_volume

SHIPPED = VolumeSpec()
OLD = VolumeSpec(
    min_ratio=0.5, max_ratio=2.0, trailing_days=28, weekly=False, noise_sd=0, calendar=()
)
WEEK = (0.85, 0.85, 0.9, 0.95, 1.1, 1.4, 0.95)  # a shop: busy Fridays and Saturdays


def retail(year: int = 2024, size: int = 2_000) -> dict[date, int]:
    """A shop's orders a day: a weekly rhythm, December rising by 45% to a peak before
    Christmas, and 24 December at half the trailing month's median, as in a real purchase
    log (0.497 x)."""
    counts = {}
    day = date(year, 10, 1)
    while day < date(year, 12, 24):
        rise = 1 + 0.45 * min(max((day - date(year, 11, 15)).days, 0) / 36, 1)
        counts[day] = round(size * WEEK[day.weekday()] * rise)
        day += timedelta(days=1)
    trailing = sorted(counts[day - timedelta(days=i)] for i in range(1, 29))
    counts[day] = round(0.497 * (trailing[13] + trailing[14]) / 2)
    return counts


def b2b(last: date, size: int = 800) -> dict[date, int]:
    """A B2B product's events: weekdays busy, weekends at a twentieth."""
    level = (1.0, 1.05, 1.05, 1.05, 0.85, 0.06, 0.04)
    return {
        last - timedelta(days=i): round(size * level[(last - timedelta(days=i)).weekday()])
        for i in range(60)
    }


def test_24_december_of_a_retail_series_passes_by_default() -> None:
    counts = retail()
    christmas_eve = date(2024, 12, 24)
    old = daily_volume(counts, christmas_eve, OLD)
    assert not old.passed and "(0.497 x," in old.found()  # what stopped the real night
    judged = daily_volume(counts, christmas_eve, SHIPPED)
    assert judged.passed and judged.calendar
    assert judged.found().endswith("; a calendar day: 0..3 x)")
    # the shop's Saturdays, twice its Mondays, pass against earlier Saturdays
    saturday = date(2024, 12, 21)
    assert daily_volume(counts, saturday, SHIPPED).passed
    assert not daily_volume(counts, saturday, OLD.model_copy(update={"max_ratio": 1.4})).passed


def test_a_b2b_weekend_passes_against_earlier_weekends() -> None:
    sunday = date(2025, 3, 16)
    counts = b2b(sunday)
    judged = daily_volume(counts, sunday, SHIPPED)
    assert judged.passed and judged.found() == "32 rows vs a median of 32 (1.00 x)"
    monday = sunday + timedelta(days=1)
    assert daily_volume(b2b(monday), monday, SHIPPED).passed
    flat = daily_volume(counts, sunday, SHIPPED.model_copy(update={"weekly": False}))
    assert not flat.passed  # against every day of the month: 0.04 x


@pytest.mark.parametrize(
    ("fault", "rows"),
    [("a day at 30%", 240), ("a missing day", 0), ("a doubled day", 1_600)],
)
def test_a_real_fault_still_fails(fault: str, rows: int) -> None:
    tuesday = date(2025, 3, 11)
    counts = b2b(tuesday) | {tuesday: rows}
    judged = daily_volume(counts, tuesday, SHIPPED)
    assert not judged.passed, fault
    assert judged.expected == 840


def test_the_calendar_trades_detection_on_its_days() -> None:
    """A missing 24 December passes the default calendar (0..3 x), the price of not
    stopping a shop on Christmas Eve; without a calendar it fails."""
    counts = retail() | {date(2024, 12, 24): 0}
    assert daily_volume(counts, date(2024, 12, 24), SHIPPED).passed
    strict = SHIPPED.model_copy(update={"calendar": ()})
    assert not daily_volume(counts, date(2024, 12, 24), strict).passed


def test_a_declared_holiday_passes_and_is_no_peer_of_later_days() -> None:
    good_friday = date(2025, 4, 18)
    counts = b2b(good_friday + timedelta(days=7)) | {good_friday: 40}
    declared = SHIPPED.model_copy(
        update={"calendar": (VolumeDays(days=("2025-04-18",), min_ratio=0),)}
    )
    assert not daily_volume(counts, good_friday, SHIPPED).passed
    assert daily_volume(counts, good_friday, declared).passed
    # the Friday after compares with the three Fridays before the holiday
    after = daily_volume(counts, good_friday + timedelta(days=7), declared)
    assert after.expected == 680 and after.passed


@pytest.mark.parametrize(
    ("rows", "shown"),
    [
        (7_996, "0.3998 x"),  # just under 0.4: fails
        (8_004, "0.4002 x"),  # just over: passes
        (33_990, "1.6995 x"),
        (34_010, "1.7005 x"),
    ],
)
def test_the_ratio_shows_which_side_of_the_bound_it_falls(rows: int, shown: str) -> None:
    friday = date(2025, 3, 14)
    counts = {friday - timedelta(days=7 * i): 20_000 for i in range(1, 5)} | {friday: rows}
    judged = daily_volume(counts, friday, SHIPPED)
    assert f"({shown}" in judged.found()
    assert judged.passed is (0.4 <= rows / 20_000 <= 1.7)


def test_a_few_rows_a_day_are_not_stopped_by_chance() -> None:
    friday = date(2025, 3, 14)
    counts = {friday - timedelta(days=7 * i): n for i, n in enumerate((6, 5, 7, 6), 1)}
    chance = daily_volume(counts | {friday: 2}, friday, SHIPPED)  # 0.33 x of 6 rows
    assert chance.passed
    assert chance.found() == "2 rows vs a median of 6 (0.33 x, 2.0 sd of counting noise)"
    sixty = {friday - timedelta(days=7 * i): 60 for i in range(1, 5)}
    gone = daily_volume(sixty | {friday: 0}, friday, SHIPPED)  # no rows where 60 were due
    assert not gone.passed and "14.3 sd" in gone.found()


def test_a_day_always_empty_passes_and_a_new_table_has_nothing_to_compare_with() -> None:
    sunday = date(2025, 3, 16)
    assert daily_volume({sunday - timedelta(days=7): 0}, sunday, SHIPPED).passed
    first = date(2025, 3, 10)
    young = {first + timedelta(days=i): 100 for i in range(7)}
    judged = daily_volume(young, sunday, SHIPPED, since=first)
    assert judged.passed and judged.found() == "100 rows; no earlier day to compare with"
    # without knowing where the history starts, the days before it count as empty
    assert not daily_volume(young, sunday, SHIPPED).passed


def test_the_window_judges_each_day_as_its_own_night_did() -> None:
    last = date(2025, 3, 20)
    counts = b2b(last)
    first = last - timedelta(days=28)
    clean = window_volume(counts, first, last, SHIPPED, min(counts))
    assert all(d.passed for d in clean)
    assert [d.passed for d in clean] == [
        daily_volume(counts, d.day, SHIPPED, min(counts)).passed for d in clean
    ]
    # a day shifted by a time zone bug: a gap, then a double
    shifted = dict(counts)
    gap = date(2025, 3, 11)
    shifted[gap + timedelta(days=1)] += shifted[gap]
    shifted[gap] = 0
    odd = [d.day for d in window_volume(shifted, first, last, SHIPPED, min(counts)) if not d.passed]
    assert odd == [gap, gap + timedelta(days=1)]
