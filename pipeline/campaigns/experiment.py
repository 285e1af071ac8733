"""The campaign as an experiment: power before claims, and uplift pooled over weekly cohorts.

The permanent control group makes every campaign a randomized experiment: the control
members who would have made the same cut are compared with the contacted. One campaign's
control band is small (about ``capacity * f / (1 - f)`` for a control fraction ``f``),
so a single night measures little. Here:

* ``minimum_detectable_effect`` and ``weeks_needed``: the two-sided test of two
  proportions (normal approximation) at ``ALPHA`` and ``POWER``;
* ``pooled``: the campaigns' uplifts combined over weekly cohorts by the
  Mantel-Haenszel risk difference (each week weighted by ``n1 * n0 / (n1 + n0)``), with
  a Wald interval from the weeks' variances; it is conclusive when the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from pipeline.store import db

if TYPE_CHECKING:
    from pipeline.conf.sections import Campaign

ALPHA = 0.05
POWER = 0.8


def _z_sum(alpha: float = ALPHA, power: float = POWER) -> float:
    nd = NormalDist()
    return nd.inv_cdf(1 - alpha / 2) + nd.inv_cdf(power)


def minimum_detectable_effect(
    contacted: float, control: float, base_rate: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The smallest absolute uplift detected with probability ``power`` at level ``alpha``
    with ``contacted`` and ``control`` entities whose outcome rate is ``base_rate``."""
    if contacted <= 0 or control <= 0:
        return math.inf
    spread = base_rate * (1 - base_rate) * (1 / contacted + 1 / control)
    return _z_sum(alpha, power) * math.sqrt(spread)


def weeks_needed(
    effect: float,
    contacted_per_week: float,
    control_per_week: float,
    base_rate: float,
    alpha: float = ALPHA,
    power: float = POWER,
) -> int | None:
    """Weeks of campaigns after which ``effect`` is detectable (None: never, e.g. no control)."""
    if effect == 0 or contacted_per_week <= 0 or control_per_week <= 0:
        return None
    one_week = minimum_detectable_effect(
        contacted_per_week, control_per_week, base_rate, alpha, power
    )
    return max(1, math.ceil((one_week / abs(effect)) ** 2))


def control_per_campaign(capacity: int, control_fraction: float) -> float:
    """Control members expected to make a full campaign's cut: the hash leaves ``f`` of
    the band out, so ``capacity`` non-members come with ``capacity * f / (1 - f)`` members."""
    return capacity * control_fraction / (1 - control_fraction)


def plan(
    capacity: int,
    control_fraction: float,
    base_rate: float,
    effect: float,
    campaigns_per_week: float,
    weeks: int,
) -> dict[str, Any]:
    """The power calculation of a campaign's config, before any outcome is known."""
    n1 = capacity * campaigns_per_week
    n0 = control_per_campaign(capacity, control_fraction) * campaigns_per_week
    return {
        "contacted_per_week": n1,
        "control_per_week": n0,
        "base_rate": base_rate,
        "weeks": weeks,
        "mde": minimum_detectable_effect(n1 * weeks, n0 * weeks, base_rate),
        "effect": effect,
        "weeks_needed": weeks_needed(effect, n1, n0, base_rate),
        "alpha": ALPHA,
        "power": POWER,
    }


def plan_of(campaign: Campaign) -> dict[str, Any]:
    """``plan`` for a campaign's config (its capacity, control fraction and experiment block)."""
    e = campaign.experiment
    return plan(
        campaign.capacity,
        campaign.control_fraction,
        e.base_rate,
        e.effect,
        e.campaigns_per_week,
        e.weeks,
    )


def plan_text(p: Mapping[str, Any]) -> str:
    """One paragraph: what the config can detect and how long the target effect takes."""
    needed = p["weeks_needed"]
    return (
        f"{p['contacted_per_week']:,.0f} contacted and about {p['control_per_week']:,.0f} "
        f"comparable control members a week, outcome rate {p['base_rate']:.1%}: after "
        f"{p['weeks']} weeks the smallest detectable uplift is {p['mde'] * 100:.1f} pp "
        f"(two-sided {p['alpha']:.0%}, power {p['power']:.0%}); an uplift of "
        f"{p['effect'] * 100:.1f} pp needs "
        + (f"{needed} week{'s' if needed != 1 else ''}" if needed else "a control group")
    )


def week_of(day: date) -> date:
    """The Monday of ``day``'s ISO week: the cohort a campaign belongs to."""
    return date.fromordinal(day.toordinal() - day.weekday())


def cohort_weight(contacted: int, control: int) -> float:
    """A weekly cohort's Mantel-Haenszel weight in the pooled uplift."""
    return contacted * control / (contacted + control)


def pooled(rows: Iterable[Mapping[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Pool measured campaigns (rows of ``monitoring.campaign_uplift``) over weekly cohorts.

    Returns the cohorts (week, counts, uplift), the Mantel-Haenszel uplift with its
    interval, the control rate, whether the interval excludes 0, the minimum detectable
    effect of the data so far and, at the observed uplift, how many weeks in all the
    experiment needs to be conclusive at ``POWER``.
    """
    weeks: dict[date, list[int]] = {}
    for r in rows:
        w = weeks.setdefault(week_of(db.to_date(r["score_date"])), [0, 0, 0, 0])
        w[0] += int(r["contacted"])
        w[1] += int(r["contacted_positives"])
        w[2] += int(r["control"])
        w[3] += int(r["control_positives"])
    cohorts: list[dict[str, Any]] = []
    num = den = var = 0.0
    n1 = n0 = k0 = 0
    for week, (w1, j1, w0, j0) in sorted(weeks.items()):
        if not w1 or not w0:
            continue
        p1, p0 = j1 / w1, j0 / w0
        weight = cohort_weight(w1, w0)
        num += weight * (p0 - p1)
        den += weight
        var += weight**2 * (p0 * (1 - p0) / w0 + p1 * (1 - p1) / w1)
        n1, n0, k0 = n1 + w1, n0 + w0, k0 + j0
        cohorts.append(
            {"week": week.isoformat(), "contacted": w1, "control": w0, "uplift": p0 - p1}
        )
    out: dict[str, Any] = {"cohorts": cohorts, "weeks": len(cohorts)}
    if not cohorts:
        return out | {"uplift": None, "ci_low": None, "ci_high": None, "conclusive": False}
    uplift = num / den
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(var) / den
    base = k0 / n0
    needed = weeks_needed(uplift, n1 / len(cohorts), n0 / len(cohorts), base)
    return out | {
        "contacted": n1,
        "control": n0,
        "control_rate": base,
        "uplift": uplift,
        "ci_low": uplift - half,
        "ci_high": uplift + half,
        "conclusive": uplift - half > 0 or uplift + half < 0,
        "mde": minimum_detectable_effect(n1, n0, base),
        "weeks_needed": needed,
    }


def pooled_text(p: Mapping[str, Any]) -> str:
    """The experiment's state in one sentence."""
    if p["uplift"] is None:
        return "no campaign has matured yet"
    verdict = (
        "conclusive: the interval excludes 0"
        if p["conclusive"]
        else "not conclusive yet"
        + (
            f"; at this uplift it needs about {p['weeks_needed']} weeks in all"
            if p["weeks_needed"]
            else ""
        )
    )
    return (
        f"{p['uplift'] * 100:+.1f} pp (95% CI {p['ci_low'] * 100:+.1f} .. "
        f"{p['ci_high'] * 100:+.1f}) over {p['weeks']} weekly cohort"
        f"{'s' if p['weeks'] != 1 else ''}: {p['contacted']:,} contacted, {p['control']:,} "
        f"control (outcome rate {p['control_rate']:.1%}); smallest detectable so far "
        f"{p['mde'] * 100:.1f} pp; {verdict}"
    )
