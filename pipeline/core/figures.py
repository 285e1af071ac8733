"""Figures in messages, printed to the digit that shows which side of a limit they fall on.

A check that fails with ``found 0.250`` against ``<= 0.25``, or ``0.50 x`` against
``0.5..2.0``, reads as a contradiction: the value was 0.2504 or 0.497. These helpers add
decimals until the printed value and the printed limit differ (or the two are equal).
"""

from __future__ import annotations

import math


def beside(value: float, limit: float, digits: int = 3, *, signed: bool = False) -> str:
    """``value`` with at least ``digits`` decimals, and as many more as it takes to show
    which side of ``limit`` it falls on (never ``0.250`` against a limit of 0.25)."""
    if not math.isfinite(value):
        return str(value)
    places = digits
    while places < 12 and value != limit and round(value, places) == round(limit, places):
        places += 1
    return f"{value:{'+' if signed else ''}.{places}f}"


def percent(value: float, limit: float, digits: int = 1) -> str:
    """A share as a percentage, to the digit that shows its side of ``limit`` (a share too)."""
    return f"{beside(100 * value, 100 * limit, digits)}%"


def within(value: float, low: float, high: float, digits: int = 2) -> str:
    """``value`` against a range: to the digit that shows its side of the nearer bound."""
    nearer = low if abs(value - low) <= abs(value - high) else high
    return beside(value, nearer, digits)
