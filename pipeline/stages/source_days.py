"""What a source table holds per day, judged: the volume rule and past days rewritten.

The volume rule (``judge_day``) is a plain function of rows per day: a day against the
median rows of its peer days, under the bounds its calendar entry or its table sets, or
within the counting noise of that median. ``daily_volume`` judges the last complete day
against the same weekday before it, ``window_volume`` every day of the window the same
way; ``benchmarks/volume.py`` measures the rule on series of known truth.
``rewritten_days`` compares the rows and the content fingerprint an earlier run kept of
each past day with what this run sees, and finds the history rewritten since.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from pipeline.conf.contract import Contract, VolumeSpec
from pipeline.core.figures import beside, percent, within
from pipeline.stages.checks import CheckResult
from pipeline.stages.source_queries import STAGE
from pipeline.store import db


@dataclass(frozen=True)
class DayVolume:
    """A day's rows against the rows its peer days lead one to expect (``judge_day``)."""

    day: date
    rows: int
    expected: float  # the median rows of the peer days
    peers: int  # how many peer days (none: nothing to compare with, the day passes)
    low: float  # the ratio bounds in force on the day: its calendar entry's, else the table's
    high: float
    noise_sd: float
    calendar: bool  # the volume calendar lists the day

    @property
    def ratio(self) -> float:
        """Rows over expected rows (1 when both are 0: a day that is always empty)."""
        if self.expected:
            return self.rows / self.expected
        return 1.0 if self.rows == 0 else math.inf

    @property
    def deviation(self) -> float:
        """How many standard deviations of counting noise the rows lie from the expected
        rows: the square root of a Poisson count (Anscombe's, plus 3/8) has a standard
        deviation of 1/2 whatever its mean."""
        return 2 * abs(math.sqrt(self.rows + 0.375) - math.sqrt(self.expected + 0.375))

    @property
    def passed(self) -> bool:
        return (
            not self.peers or self.low <= self.ratio <= self.high or self.deviation <= self.noise_sd
        )

    def found(self) -> str:
        """The rows, the median and the ratio, to the digit that shows its side of the
        bounds; the deviation too when the ratio is outside them."""
        if not self.peers:
            return f"{self.rows:,} rows; no earlier day to compare with"
        text = (
            f"{self.rows:,} rows vs a median of {self.expected:,.0f} "
            f"({within(self.ratio, self.low, self.high)} x"
        )
        if not self.low <= self.ratio <= self.high:
            text += f", {beside(self.deviation, self.noise_sd, 1)} sd of counting noise"
        if self.calendar:
            text += f"; a calendar day: {self.low:g}..{self.high:g} x"
        return text + ")"


def judge_day(
    counts: Mapping[date, int], day: date, peers: Sequence[date], spec: VolumeSpec
) -> DayVolume:
    """The rows of ``day`` against the median rows of ``peers`` (a day without rows counts
    0), under the bounds ``spec`` sets for ``day`` (its calendar's, else its own). Peers the
    calendar lists are left out, unless it lists them all."""
    usual = [p for p in peers if spec.bounds(p) is None] or list(peers)
    expected = float(statistics.median([counts.get(p, 0) for p in usual])) if usual else 0.0
    bounds = spec.bounds(day)
    low, high = bounds or (spec.min_ratio, spec.max_ratio)
    return DayVolume(
        day,
        counts.get(day, 0),
        expected,
        len(usual),
        low,
        high,
        spec.noise_sd,
        bounds is not None,
    )


def daily_volume(
    counts: Mapping[date, int], day: date, spec: VolumeSpec, since: date | None = None
) -> DayVolume:
    """The ``daily_volume`` check: ``day`` against the same weekday in the
    ``spec.trailing_days`` days before it (every one of those days when not ``weekly``).
    Days before ``since``, the table's first day of rows, are no peers."""
    peers = [
        day - timedelta(days=i)
        for i in range(1, spec.trailing_days + 1)
        if not spec.weekly or i % 7 == 0
    ]
    if since is not None:
        peers = [p for p in peers if p >= since]
    return judge_day(counts, day, peers, spec)


def window_volume(
    counts: Mapping[date, int],
    first: date,
    last: date,
    spec: VolumeSpec,
    since: date | None = None,
) -> list[DayVolume]:
    """The ``days_complete`` check: each day of ``first..last`` judged as
    :func:`daily_volume` judges a last day. A day that passed on its own night passes
    here unless its rows or its peers' rows have changed since (a day shifted by a time
    zone bug, a reload), so a clean series stops no more nights here than there."""
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    return [daily_volume(counts, d, spec, since) for d in days]


def volume_expected(spec: VolumeSpec, day: date, peers: str) -> str:
    """What a volume check of ``day`` expects: the ratio bounds in force on the day (its
    calendar entry's, else the table's) times the median of ``peers``, or the counting
    noise."""
    bounds = spec.bounds(day)
    low, high = bounds or (spec.min_ratio, spec.max_ratio)
    shown = f"{low:g}..{high:g} x {peers}"
    if bounds is not None:
        shown += f" ({day} is a calendar day)"
    return (
        f"{shown}, or within {spec.noise_sd:g} sd of counting noise "
        "(volume: min_ratio, max_ratio, noise_sd, calendar)"
    )


def rewritten_days(
    previous: Mapping[str, Mapping[date, tuple[int, str | None]]],
    seen_before: date,
    current: Mapping[str, Mapping[date, tuple[int, str | None]]],
    schema: str,
    contract: Contract,
    since: Mapping[str, date] | None = None,
) -> list[CheckResult]:
    """Past days that changed since an earlier run saw them: rows added or removed, or the
    same rows with other content (restated in place).

    ``previous`` is what an earlier run saw of each table per day (rows and a content
    fingerprint, for days before its own run date ``seen_before``); ``current`` what this
    run sees. Days before ``since[table]`` (the lookback of what the use case reads) are not
    compared. A change warns; more added or removed rows than
    ``contract.max_rewritten_fraction`` of what the earlier run saw on the compared days
    fails. A day restated with the same rows warns (the kept windows are rebuilt from the
    facts, so nothing served relies on the old values).
    """
    out = []
    for table, before in previous.items():
        now = current.get(table)
        if now is None:
            continue
        first = (since or {}).get(table)
        compared = [d for d in before if d < seen_before and (first is None or d >= first)]
        counted: dict[date, tuple[int, int]] = {}
        restated: list[tuple[date, int]] = []
        for d in compared:
            (was, was_content), (rows, content) = before[d], now.get(d, (0, None))
            if rows != was:
                counted[d] = (was, rows)
            elif db.same_kind(was_content, content) and content != was_content:
                restated.append((d, rows))
        seen = sum(before[d][0] for d in compared)
        moved = sum(abs(b - a) for a, b in counted.values())
        limit = contract.max_rewritten_fraction
        fraction = moved / seen if seen else (1.0 if moved else 0.0)
        said = [(d, f"{d}: {a:,} -> {b:,} rows") for d, (a, b) in counted.items()]
        said += [(d, f"{d}: {n:,} rows, content changed") for d, n in restated]
        said.sort()
        shown = "; ".join(text for _, text in said[:5])
        more = f"; and {len(said) - 5} more days" if len(said) > 5 else ""
        window = f" since {first}" if first is not None else ""
        out.append(
            CheckResult(
                STAGE,
                "history_unchanged",
                f"{schema}.{table}",
                not said,
                f"past days{window} as an earlier run saw them, rows and content (changes "
                f"warn; more than {limit:.1%} of their rows added or removed fail: "
                "max_rewritten_fraction)",
                f"{len(said)} of {len(compared)} days changed ({len(restated)} restated in "
                f"place), {moved:,} rows added or removed ({percent(fraction, limit, 2)})"
                f"{': ' + shown + more if said else ''}",
                severity="fail" if fraction > limit else "warn",
            )
        )
    return out
