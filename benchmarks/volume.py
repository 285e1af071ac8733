"""How often does the daily volume check stop a clean night, and how often does it catch a bad day?

    .venv/bin/python benchmarks/volume.py [--years 8] [--sweep]    # 45 s on 2 cores

Draws daily row counts of known truth: a steady table (every day alike, like a usage log),
a B2B product whose weekends are quiet and whose offices close on public holidays and
between Christmas and New Year (once with those days declared in the table's volume
calendar, once not), and a retail shop with a weekly rhythm and a Christmas and New Year
season (a December rise, a low 24 and 25 December, Boxing Day sales, a quiet New Year's
Day and a slow January). A day's count is Poisson around its level times a lognormal
day-to-day factor (3% to 10%), at 50 to 50,000 rows on an ordinary day; each year a
different calendar year, so that holidays fall on different weekdays.

On every day of a year (each day in turn the last day of a night) it runs the shipped
rule, ``pipeline.stages.source_days.daily_volume`` with the defaults of ``VolumeSpec`` (and the
B2B product's own calendar where it declares one): on the clean series it counts the
nights ``daily_volume`` stops (false alarms per year) and those ``days_complete`` stops
(``window_volume`` applies the same rule to each earlier day of the 30-day window, so
these are counted from the same verdicts); with the day replaced by a fault (30% of its
rows, 300%, none, twice its rows) it counts how often ``daily_volume`` stops that night
(detection, %). The old rule, 0.5..2.0 x the plain median of the 28 days before (no
weekdays, no calendar, no noise allowance), is the same function with those settings,
and the old window check (every day within 0.5..2.0 x the window's median day) is run as
it was, in the same run. ``--sweep`` adds, for other bounds and noise allowances, the
worst false alarms per year and the least detection at each size, the table the
defaults were chosen from. Seeded: the same arguments print the same tables.

The last line reads
``volume: false alarms/yr <max over cases> (old <max>); 30% caught <min at 500+ rows> %, doubled caught <min at 500+ rows> %``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np

from pipeline.conf.contract import VolumeDays, VolumeSpec
from pipeline.stages.source_days import daily_volume

SIZES = (50, 500, 5_000, 50_000)
WINDOW_DAYS = 30  # the contract's window: days_complete judges its days before the last
FIRST_YEAR = 2011
SEED = 20240601
OLD = VolumeSpec(
    min_ratio=0.5, max_ratio=2.0, trailing_days=28, weekly=False, noise_sd=0, calendar=()
)
FAULTS: dict[str, Callable[[np.random.Generator, int], int]] = {
    "a day at 30%": lambda rng, n: int(rng.binomial(n, 0.3)),
    "a day at 300%": lambda rng, n: 3 * n,
    "a missing day": lambda rng, n: 0,
    "a doubled day": lambda rng, n: 2 * n,
}


# -- the worlds ---------------------------------------------------------------------------


def easter(year: int) -> date:
    """Easter Sunday (the anonymous Gregorian algorithm)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = divmod(b, 4)
    g = (8 * b + 13) // 25
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    l_ = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * l_) // 451
    month, day = divmod(h + l_ - 7 * m + 114, 31)
    return date(year, month, day + 1)


def office_holidays(year: int) -> list[date]:
    """The days a B2B customer's offices close: New Year's Day, Good Friday, Easter Monday,
    1 May, Ascension, Whit Monday, 24-26 and 31 December."""
    e = easter(year)
    moving = [e - timedelta(days=2), e + timedelta(days=1), e + timedelta(days=39)]
    moving.append(e + timedelta(days=50))
    fixed = [date(year, 1, 1), date(year, 5, 1)] + [date(year, 12, d) for d in (24, 25, 26, 31)]
    return sorted(fixed + moving)


def b2b_level(day: date) -> float:
    if day in _B2B_HOLIDAYS.setdefault(day.year, set(office_holidays(day.year))):
        return 0.05
    week = (1.0, 1.05, 1.05, 1.05, 0.85, 0.06, 0.04)[day.weekday()]
    if day.month == 12 and 27 <= day.day <= 30:
        return min(week, 0.45)  # between the years
    return week


_B2B_HOLIDAYS: dict[int, set[date]] = {}


def b2b_calendar(years: range) -> tuple[VolumeDays, ...]:
    """What the B2B product declares: its holidays (any count) and between the years."""
    closed = [d.isoformat() for y in years for d in office_holidays(y)]
    return (
        VolumeDays(days=tuple(closed), min_ratio=0.0),
        VolumeDays(days=("12-27", "12-28", "12-29", "12-30"), min_ratio=0.2),
    )


def retail_level(day: date) -> float:
    week = (0.85, 0.85, 0.9, 0.95, 1.1, 1.4, 0.95)[day.weekday()]
    season = {(12, 24): 0.55, (12, 25): 0.12, (12, 26): 1.3, (12, 31): 0.7, (1, 1): 0.35}
    special = season.get((day.month, day.day))
    if special is not None:
        return special
    start = date(day.year, 11, 15)
    if day.month == 1:  # a slow January, back to normal by February
        factor = 0.8 + 0.2 * (day.day - 1) / 30
    elif day.month == 12 and 22 <= day.day <= 23:
        factor = 1.5
    elif day.month == 12 and day.day >= 27:
        factor = 1.05
    elif day >= start:
        factor = 1.0 + 0.45 * min((day - start).days / 36, 1.0)
    else:
        factor = 1.0
    return week * factor


def steady_level(day: date) -> float:
    return 1.0 + 0.1 * (day.timetuple().tm_yday / 365)


@dataclass(frozen=True)
class Case:
    name: str
    level: Callable[[date], float]
    day_noise: float  # sd of the lognormal day-to-day factor
    spec: VolumeSpec  # the table's contract (the shipped defaults, and its own calendar)


def cases(years: range) -> list[Case]:
    shipped = VolumeSpec()
    # the calendar spans every simulated year and the January after the last
    declared = VolumeSpec(calendar=b2b_calendar(range(years.start, years.stop + 1)))
    return [
        Case("steady (every day alike)", steady_level, 0.03, shipped),
        Case("B2B, quiet weekends, holidays declared", b2b_level, 0.08, declared),
        Case("B2B, quiet weekends, holidays not declared", b2b_level, 0.08, shipped),
        Case("retail, weekly rhythm, Christmas season", retail_level, 0.10, shipped),
    ]


def series(case: Case, size: int, year: int, rng: np.random.Generator) -> dict[date, int]:
    """Rows per day from 1 January of ``year`` to 1 March of the next."""
    first = date(year, 1, 1)
    days = [first + timedelta(days=i) for i in range((date(year + 1, 3, 1) - first).days)]
    level = np.array([case.level(d) for d in days]) * size
    noisy = level * np.exp(rng.normal(0, case.day_noise, len(days)))
    return dict(zip(days, rng.poisson(noisy).tolist(), strict=True))


def nights(year: int) -> list[date]:
    """The last days judged: 1 March of ``year`` to 28 February of the next (365 nights)."""
    first = date(year, 3, 1)
    return [first + timedelta(days=i) for i in range(365)]


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Tally:
    years: int = 0
    nights_stopped: int = 0  # daily_volume failed on a clean series
    window_stopped: int = 0  # days_complete failed on a clean series
    caught: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULTS, 0))
    tried: int = 0


def old_window_passes(counts: dict[date, int], last: date) -> bool:
    """The old days_complete, as it was: each day of the window before the last within
    0.5..2.0 x the median day of those days."""
    days = [last - timedelta(days=i) for i in range(1, WINDOW_DAYS)]
    median = statistics.median([counts.get(d, 0) for d in days])
    return all(0.5 <= counts.get(d, 0) / median <= 2.0 for d in days)


def measure(
    counts: dict[date, int],
    year: int,
    spec: VolumeSpec,
    rng: np.random.Generator,
    tally: Tally,
    old: bool,
) -> None:
    """Every night of ``year`` on the clean series, and each fault on each night's last day.

    ``window_volume`` judges each day of the window exactly as ``daily_volume`` judged it
    on its own night (same rows, same peers), so its stops are counted from the daily
    verdicts; the old window check is run as it was."""
    since = min(counts)
    judged = nights(year)
    tally.years += 1
    first = judged[0] - timedelta(days=WINDOW_DAYS - 1)
    passed = {
        first + timedelta(days=i): daily_volume(
            counts, first + timedelta(days=i), spec, since
        ).passed
        for i in range((judged[-1] - first).days + 1)
    }
    for last in judged:
        tally.nights_stopped += not passed[last]
        if old:
            tally.window_stopped += not old_window_passes(counts, last)
        else:
            window = [last - timedelta(days=i) for i in range(1, WINDOW_DAYS)]
            tally.window_stopped += not all(passed[d] for d in window)
        clean = counts[last]
        tally.tried += 1
        for fault, change in FAULTS.items():
            counts[last] = change(rng, clean)
            tally.caught[fault] += not daily_volume(counts, last, spec, since).passed
        counts[last] = clean


def run(
    years: int, specs: dict[str, Callable[[Case], VolumeSpec]]
) -> dict[tuple[str, str, int], Tally]:
    """Per (case, rule, size): what the rule did over ``years`` simulated years."""
    span = range(FIRST_YEAR, FIRST_YEAR + years)
    out: dict[tuple[str, str, int], Tally] = {}
    for c_index, case in enumerate(cases(span)):
        for size in SIZES:
            for year in span:
                rng = np.random.default_rng([SEED, c_index, size, year])
                counts = series(case, size, year, rng)
                for rule, spec_of in specs.items():
                    tally = out.setdefault((case.name, rule, size), Tally())
                    measure(counts, year, spec_of(case), rng, tally, rule == "old")
    return out


def print_tables(out: dict[tuple[str, str, int], Tally], names: list[str]) -> None:
    head = "".join(f"{f'{s:,}':>14}" for s in SIZES)
    sub = "".join(f"{'new':>8}{'old':>6}" for _ in SIZES)
    rows: list[tuple[str, Callable[[Tally], float], str]] = [
        ("false alarms / year", lambda t: t.nights_stopped / t.years, ".1f"),
        ("days_complete stops / year", lambda t: t.window_stopped / t.years, ".0f"),
    ]
    rows += [
        (f"{fault}: caught %", lambda t, f=fault: 100 * t.caught[f] / t.tried, ".0f")
        for fault in FAULTS
    ]
    for name in names:
        print(f"\n{name}")
        print(f"  {'rows on an ordinary day':<28}{head}")
        print(f"  {'':<28}{sub}")
        for label, figure, fmt in rows:
            cells = "".join(
                f"{figure(out[(name, 'new', s)]):>8{fmt}}{figure(out[(name, 'old', s)]):>6{fmt}}"
                for s in SIZES
            )
            print(f"  {label:<28}{cells}")


def sweep(years: int) -> None:
    """Worst false alarms per year over the cases (holidays declared) and the least
    detection per fault at each size, for other bounds and noise allowances."""
    grid = [
        (lo, hi, sd)
        for lo in (0.35, 0.4, 0.45, 0.5)
        for hi in (1.6, 1.7, 1.8)
        for sd in (4.0, 5.0, 6.0)
    ]
    specs = {
        f"{lo}..{hi} sd {sd:g}": (
            lambda case, lo=lo, hi=hi, sd=sd: case.spec.model_copy(
                update={"min_ratio": lo, "max_ratio": hi, "noise_sd": sd}
            )
        )
        for lo, hi, sd in grid
    }
    out = run(years, specs)
    names = [c.name for c in cases(range(FIRST_YEAR, FIRST_YEAR + years))]
    judged = [n for n in names if "not declared" not in n]
    print("\nsweep: worst false alarms/yr over the cases; least % caught (30% / 300% / doubled)")
    print(f"  {'rule':<20}" + "".join(f"{f'{s:,}':>22}" for s in SIZES))
    for rule in specs:
        cells = ""
        for s in SIZES:
            tallies = [out[(n, rule, s)] for n in judged]
            alarms = max(t.nights_stopped / t.years for t in tallies)
            caught = [
                min(100 * t.caught[f] / t.tried for t in tallies)
                for f in ("a day at 30%", "a day at 300%", "a doubled day")
            ]
            cells += f"{alarms:>7.1f} {caught[0]:>4.0f}/{caught[1]:>3.0f}/{caught[2]:>3.0f}   "
        print(f"  {rule:<20}{cells}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--years", type=int, default=8, help="simulated years per case and size")
    ap.add_argument("--sweep", action="store_true", help="also other bounds and allowances")
    args = ap.parse_args()
    began = time.monotonic()
    shipped = VolumeSpec()
    print(
        f"daily volume, shipped defaults: {shipped.min_ratio:g}..{shipped.max_ratio:g} x the "
        f"median of the same weekday in the {shipped.trailing_days} days before, or within "
        f"{shipped.noise_sd:g} sd of counting noise; calendar "
        + "; ".join(
            f"{', '.join(e.days)}: {e.min_ratio:g}..{e.max_ratio:g} x" for e in shipped.calendar
        )
    )
    print("old rule: 0.5..2.0 x the median of the 28 days before")
    print(f"{args.years} years per case and size; nights 1 March to 28 February")
    out = run(args.years, {"new": lambda case: case.spec, "old": lambda case: OLD})
    names = [c.name for c in cases(range(FIRST_YEAR, FIRST_YEAR + args.years))]
    print_tables(out, names)
    if args.sweep:
        sweep(args.years)
    judged = [n for n in names if "not declared" not in n]

    def worst(rule: str) -> float:
        return max(out[(n, rule, s)].nights_stopped / args.years for n in judged for s in SIZES)

    def least(fault: str) -> float:
        return min(
            100 * out[(n, "new", s)].caught[fault] / out[(n, "new", s)].tried
            for n in judged
            for s in SIZES[1:]
        )

    print(f"\n({time.monotonic() - began:.0f} s)")
    print(
        f"volume: false alarms/yr {worst('new'):.1f} (old {worst('old'):.1f}); 30% caught "
        f"{least('a day at 30%'):.0f} %, doubled caught {least('a doubled day'):.0f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
