"""Is the retention campaign's pooled uplift unbiased, and does its 95% interval hold the truth?

    .venv/bin/python benchmarks/uplift_calibration.py [--worlds 30] [--customers 40000] [--noise 0.5] [--zero-effect-only] [--seed N] [--jobs 2]   # 6 min on 2 cores

Runs the churn retention campaign the way the demo runs it, in memory (no database), on
seeded worlds of the warehouse's simulator (``pipeline.synthetic.simulation``): each world is
simulated from its start (price rise on day 240, launch on day 300) through the demo's
eight weekly campaign nights (days 360 to 409) until the last cohort's outcome window has
closed. On each night the customers active that morning are scored by a stand-in for the
trained model: the 30-day cancellation probability implied by the day's true no-email
hazard ``h`` (``1 - (1 - h) ** 30``) with Gaussian noise of sd ``--noise`` added on the
logit scale, drawn afresh each night, so that the ranking is model-like, not an oracle.
The cut is the campaign's own: the top ``audience_deciles`` risk deciles
(``publish.risk_deciles``), opted in and not suppressed (emailed by another campaign, or
in its control band, in the ``suppression_days`` before), the permanent control group
(``keys.control_group``) left out, ``selection.choose`` up to the capacity (2.5% of
the customers, as 1,000 of the demo's 40,000). The chosen are emailed that day (the
email counts from that day's cancellation draw on) and the control members who made the
same cut are the control band. The outcome is a cancellation in [night, night + 30).

Two estimators, each pooled by ``experiment.pooled`` (Mantel-Haenszel over the weekly
cohorts, Wald interval):

* all contacts: every contacted customer and every control-band member of each cohort;
* first contacts (as ``monitor.update_campaign_uplift`` measures): only customers no
  earlier campaign had emailed or put in its control band, on either side.

The truth of each, for the same customers weighted the same way: per cohort, the mean
over its contacted of [cancelled within 30 days without any email from the night on]
(the simulator's counterfactual) minus [cancelled within 30 days], the cohorts combined
with the estimate's weights (``experiment.cohort_weight``). Each world runs twice from its
state on the first campaign night: with the emails' real effect, and with emails that do
nothing (``simulation.PERSUADED`` and ``SLEEPING_DOG`` set to 0: the truth is 0, and an
interval excluding 0 is a false conclusion). Tables per cohort (all contacts, first
contacts, repeat selections) show where an estimate's error comes from: who is selected
again, how persuadable (an email's effect < 0) the contacted and the control band are,
their mean 30-day risk without an email on the night, and their cancellations without
an email (the contacted's counterfactual, the control band's outcome): a cohort's
estimate minus its truth is the second minus the first.
Seeded: the same arguments print the same figures.

The last line reads
``uplift: coverage <share of worlds whose 95% CI holds the truth, %>; bias <mean estimate - truth, pp>; rmse <pp>``
for the first contacts with the emails' real effect (with ``--zero-effect-only``: with
emails that do nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipeline.campaigns import experiment, selection  # noqa: E402
from pipeline.conf import usecase  # noqa: E402
from pipeline.core import figures  # noqa: E402
from pipeline.core.keys import control_group  # noqa: E402
from pipeline.stages import publish  # noqa: E402
from pipeline.synthetic import demo, simulation  # noqa: E402
from pipeline.synthetic.facts import Buffers  # noqa: E402
from pipeline.synthetic.world import NEVER, Sim, World  # noqa: E402

START = date(2025, 1, 1)  # the worlds' first day (it sets the seasons)
PRICE_RISE_DAY = 240  # as world.World and the demo
NIGHTS = tuple(
    s.day
    for s in demo.SCHEDULE
    if s.dag in ("churn_campaign", demo.WEEK) and s.day < demo.UPLIFT_NIGHTS[0]
)  # the demo's weekly cohorts ranked by risk: days 360, 367, ..., 409
ESTIMATORS = {"all": "all contacts", "first": "first contacts"}
SUBSETS = ESTIMATORS | {"repeat": "repeat selections"}
EFFECTS = {"real": "emails' real effect", "zero": "emails without effect"}


@dataclass(frozen=True)
class Setup:
    """What every world shares: its size, the campaign's settings and the score's noise."""

    customers: int
    capacity: int
    control_fraction: float
    control_salt: str
    suppression_days: int
    audience_deciles: int
    horizon: int
    noise: float
    seed: int
    effects: tuple[str, ...]


@dataclass(frozen=True)
class Cohort:
    """One campaign night: its contacted and control band (indices into the simulator's
    arrays), who was selected for the first time, who an email would persuade, and each
    one's true 30-day cancellation probability without an email."""

    night: int
    contacted: np.ndarray
    control: np.ndarray
    first_contacted: np.ndarray
    first_control: np.ndarray
    persuadable_contacted: np.ndarray
    persuadable_control: np.ndarray
    risk_contacted: np.ndarray
    risk_control: np.ndarray


def setup_of(args: argparse.Namespace) -> Setup:
    """The churn use case's campaign settings, its capacity scaled to the world's size."""
    uc = usecase.load("churn")
    cfg = uc.campaign
    assert cfg is not None
    return Setup(
        customers=args.customers,
        capacity=round(args.customers * cfg.capacity / demo.DEMO_CUSTOMERS),
        control_fraction=cfg.control_fraction,
        control_salt=cfg.control_salt,
        suppression_days=cfg.suppression_days,
        audience_deciles=cfg.audience_deciles,
        horizon=uc.label.horizon_days,
        noise=args.noise,
        seed=args.seed,
        effects=("zero",) if args.zero_effect_only else tuple(EFFECTS),
    )


@contextmanager
def emails_with(effect: str) -> Iterator[None]:
    """The simulator's email effects as they are (``real``) or all 0 (``zero``)."""
    saved = simulation.PERSUADED, simulation.SLEEPING_DOG
    if effect == "zero":
        simulation.PERSUADED = simulation.SLEEPING_DOG = 0.0
    try:
        yield
    finally:
        simulation.PERSUADED, simulation.SLEEPING_DOG = saved


def selected(cohorts: list[Cohort]) -> np.ndarray:
    """Everyone the ``cohorts`` selected: their contacted and control bands."""
    return np.concatenate(
        [np.zeros(0, np.int64)] + [np.r_[c.contacted, c.control] for c in cohorts]
    )


def select(sim: Sim, setup: Setup, noise_seed: int, earlier: list[Cohort]) -> Cohort:
    """Tonight's campaign (``sim.day``): score the active customers, cut, and email the chosen."""
    t, a = sim.day, sim.a
    act = np.flatnonzero(a["active"][: sim.n])
    p = sim.p
    overdue = np.bincount(p["cust"][p["due_day"] < t], minlength=sim.n)[act]
    logit, disengaged, _, _ = simulation.cancel_logit(sim, act, simulation.Day.of(sim), overdue)
    risk = -np.expm1(setup.horizon * np.log1p(-simulation.sigmoid(logit)))
    # drawn for every customer and picked by index, from a stream the simulator never uses
    noise = np.random.default_rng([noise_seed, t, 2]).normal(0.0, setup.noise, sim.n)[act]
    prob = simulation.sigmoid(np.log(risk) - np.log1p(-risk) + noise)
    keys = a["customer_id"][act].astype(np.int64)
    order = np.lexsort((keys, -prob))
    band = order[publish.risk_deciles(prob, keys)[order] <= setup.audience_deciles]
    people = act[band]  # the band, most at risk first
    recent = [c for c in earlier if t - setup.suppression_days <= c.night]
    eligible = a["opt_in"][people] & ~np.isin(people, selected(recent))
    in_control = control_group(keys[band], setup.control_salt, setup.control_fraction)
    chosen, control_rows, _ = selection.choose(
        prob[band], eligible, in_control, setup.capacity, -np.inf
    )
    sim.sends[t] = a["customer_id"][people[chosen]]
    before = selected(earlier)
    effect = simulation.email_effect(sim, people, disengaged[band])
    return Cohort(
        night=t,
        contacted=people[chosen],
        control=people[control_rows],
        first_contacted=~np.isin(people[chosen], before),
        first_control=~np.isin(people[control_rows], before),
        persuadable_contacted=effect[chosen] < 0,
        persuadable_control=effect[control_rows] < 0,
        risk_contacted=risk[band[chosen]],
        risk_control=risk[band[control_rows]],
    )


def run_campaigns(sim: Sim, setup: Setup, noise_seed: int) -> tuple[list[Cohort], np.ndarray]:
    """The weekly campaigns from ``sim.day`` (the first night) until the last cohort's
    outcome window has closed; returns the cohorts and each customer's cancellation day
    (``world.NEVER`` if not by then)."""
    cohorts: list[Cohort] = []
    cancelled: list[tuple[np.ndarray, int]] = []
    while sim.day < NIGHTS[-1] + setup.horizon:
        if sim.day in NIGHTS:
            cohorts.append(select(sim, setup, noise_seed, cohorts))
        was = sim.a["active"][: sim.n].copy()
        day = sim.day
        simulation.simulate_day(sim, Buffers())
        cancelled.append((np.flatnonzero(was & ~sim.a["active"][: len(was)]), day))
    cancel_day = np.full(sim.n, NEVER, dtype=np.int64)
    for idx, day in cancelled:
        cancel_day[idx] = day
    return cohorts, cancel_day


@dataclass(frozen=True)
class Estimate:
    """One estimator's pooled uplift and interval in one world, and the truth it aims at."""

    uplift: float
    low: float
    high: float
    truth: float


@dataclass(frozen=True)
class Run:
    """One world under one email effect: each estimator's estimate, and per cohort the
    counts of each subset (``<subset>_<count>``, see ``cohort_counts``)."""

    estimates: dict[str, Estimate]
    cohorts: list[dict[str, float]]


def cohort_counts(sim: Sim, c: Cohort, cancel_day: np.ndarray, horizon: int) -> dict[str, float]:
    """A cohort's counts per subset: contacted ``n1`` and control ``n0``, their
    cancellations ``k1`` and ``k0``; of the contacted exposed to the email (``xn``), the
    cancellations without it (``xcf``, the simulator's counterfactual) and with it (``xk``);
    persuadables ``p1``, ``p0``; the sums of the risk without an email ``r1``, ``r0``."""
    x = sim.x
    end = c.night + horizon
    sent = x["day"] == c.night
    order = np.argsort(c.contacted)
    pos = order[np.searchsorted(c.contacted, x["cust"][sent], sorter=order)]
    exposed = np.zeros(len(c.contacted), bool)
    exposed[pos] = True
    cf_cancel = np.zeros(len(c.contacted), bool)
    cf_cancel[pos] = x["cf_day"][sent] < end
    y1 = cancel_day[c.contacted] < end
    y0 = cancel_day[c.control] < end
    counts: dict[str, float] = {}
    for name, m1, m0 in (
        ("all", np.ones(len(y1), bool), np.ones(len(y0), bool)),
        ("first", c.first_contacted, c.first_control),
        ("repeat", ~c.first_contacted, ~c.first_control),
    ):
        counts |= {
            f"{name}_n1": int(m1.sum()),
            f"{name}_k1": int(y1[m1].sum()),
            f"{name}_n0": int(m0.sum()),
            f"{name}_k0": int(y0[m0].sum()),
            f"{name}_xn": int((m1 & exposed).sum()),
            f"{name}_xcf": int(cf_cancel[m1 & exposed].sum()),
            f"{name}_xk": int(y1[m1 & exposed].sum()),
            f"{name}_p1": int(c.persuadable_contacted[m1].sum()),
            f"{name}_p0": int(c.persuadable_control[m0].sum()),
            f"{name}_r1": float(c.risk_contacted[m1].sum()),
            f"{name}_r0": float(c.risk_control[m0].sum()),
        }
    return counts


def estimate(cohorts: list[dict[str, float]], name: str) -> Estimate:
    """Estimator ``name`` (a subset) pooled by ``experiment.pooled``, and its truth: per
    cohort the mean over the exposed contacted of (cancelled without the email - with
    it), the cohorts weighted as the estimate weighs them."""
    rows = [
        {
            "score_date": START + timedelta(days=night),
            "contacted": c[f"{name}_n1"],
            "contacted_positives": c[f"{name}_k1"],
            "control": c[f"{name}_n0"],
            "control_positives": c[f"{name}_k0"],
        }
        for night, c in zip(NIGHTS, cohorts, strict=True)
    ]
    pooled = experiment.pooled(rows)
    weighted = [
        (experiment.cohort_weight(int(c[f"{name}_n1"]), int(c[f"{name}_n0"])), c)
        for c in cohorts
        if c[f"{name}_n1"] and c[f"{name}_n0"]
    ]
    truth = sum(w * (c[f"{name}_xcf"] - c[f"{name}_xk"]) / c[f"{name}_xn"] for w, c in weighted)
    return Estimate(
        pooled["uplift"], pooled["ci_low"], pooled["ci_high"], truth / sum(w for w, _ in weighted)
    )


def run_world(task: tuple[int, Setup]) -> dict[str, Run]:
    """One world: simulated to its first campaign night, then once per email effect."""
    index, setup = task
    world_seed = int(np.random.SeedSequence([setup.seed, index]).generate_state(1)[0])
    sim = Sim(
        World(
            setup.customers,
            START,
            seed=world_seed,
            price_rise_day=PRICE_RISE_DAY,
            launch_day=demo.LAUNCH_DAY,
        )
    )
    simulation.initial_population(sim, Buffers())
    while sim.day < NIGHTS[0]:
        simulation.simulate_day(sim, Buffers())
    state = sim.dumps()
    out = {}
    for effect in setup.effects:
        branch = Sim.loads(state)
        with emails_with(effect):
            cohorts, cancel_day = run_campaigns(branch, setup, world_seed)
        counts = [cohort_counts(branch, c, cancel_day, setup.horizon) for c in cohorts]
        out[effect] = Run({name: estimate(counts, name) for name in ESTIMATORS}, counts)
    return out


# -- the summary --------------------------------------------------------------------------


def summary(runs: list[Run], name: str) -> dict[str, float]:
    """Over the worlds: coverage, bias, rmse, mean estimate, mean truth, mean half-width of
    the interval, share of intervals excluding 0."""
    e = [r.estimates[name] for r in runs]
    est, truth = np.array([x.uplift for x in e]), np.array([x.truth for x in e])
    low, high = np.array([x.low for x in e]), np.array([x.high for x in e])
    return {
        "coverage": float(np.mean((low <= truth) & (truth <= high))),
        "bias": float(np.mean(est - truth)),
        "rmse": float(np.sqrt(np.mean((est - truth) ** 2))),
        "estimate": float(np.mean(est)),
        "truth": float(np.mean(truth)),
        "half": float(np.mean((high - low) / 2)),
        "conclusive": float(np.mean((low > 0) | (high < 0))),
    }


def print_summary(runs: dict[str, list[Run]]) -> None:
    worlds = len(next(iter(runs.values())))
    print(f"\npooled uplift over {worlds} worlds (pp; positive: cancellations prevented)")
    print(
        f"  {'emails':<23}{'estimator':<16}{'coverage':>9}{'bias':>8}{'rmse':>7}"
        f"{'estimate':>10}{'truth':>8}{'CI +/-':>8}{'CI excludes 0':>15}"
    )
    for effect, effect_runs in runs.items():
        for name, label in ESTIMATORS.items():
            s = summary(effect_runs, name)
            print(
                f"  {EFFECTS[effect]:<23}{label:<16}{100 * s['coverage']:>8.1f}%"
                f"{100 * s['bias']:>+8.2f}{100 * s['rmse']:>7.2f}{100 * s['estimate']:>+10.2f}"
                f"{100 * s['truth']:>+8.2f}{100 * s['half']:>8.2f}{100 * s['conclusive']:>14.1f}%"
            )


def totals(runs: list[Run]) -> list[dict[str, float]]:
    """Each cohort's counts summed over the worlds."""
    return [
        {k: sum(r.cohorts[i][k] for r in runs) for k in runs[0].cohorts[i]}
        for i in range(len(NIGHTS))
    ]


def pair(contacted: float, control: float) -> str:
    """Two percentages, contacted / control."""
    return f"{100 * contacted:>7.1f} /{100 * control:>5.1f}"


def print_cohorts(runs: list[Run], name: str, title: str) -> None:
    """Per weekly cohort, summed over the worlds: sizes, repeat selections (all contacts),
    persuadables, risk without an email on the night, cancellations without an email
    (the contacted's counterfactual; the control band's outcome), and the cohort's
    uplift, truth and their difference (the control band's outcome minus the contacted's
    counterfactual)."""
    worlds = len(runs)
    print(f"\n{title}, per weekly cohort (summed over the {worlds} worlds; contacted / control)")
    print(
        f"  {'week':<5}{'contacted':>10}{'control':>8}"
        + (f"{'repeat %':>15}" if name == "all" else "")
        + f"{'persuadable %':>15}{'risk %':>15}{'no-email outcome %':>20}"
        f"{'uplift':>8}{'truth':>7}{'bias':>7}"
    )
    for week, c in enumerate(totals(runs), 1):
        n1, n0, xn = c[f"{name}_n1"], c[f"{name}_n0"], c[f"{name}_xn"]
        if not n1 or not n0:
            continue
        uplift = c[f"{name}_k0"] / n0 - c[f"{name}_k1"] / n1
        truth = (c[f"{name}_xcf"] - c[f"{name}_xk"]) / xn
        repeat = pair(1 - c["first_n1"] / n1, 1 - c["first_n0"] / n0) if name == "all" else ""
        print(
            f"  {week:<5}{n1 / worlds:>10.0f}{n0 / worlds:>8.0f}{repeat:>{15 if repeat else 0}}"
            f"{pair(c[f'{name}_p1'] / n1, c[f'{name}_p0'] / n0):>15}"
            f"{pair(c[f'{name}_r1'] / n1, c[f'{name}_r0'] / n0):>15}"
            f"{pair(c[f'{name}_xcf'] / xn, c[f'{name}_k0'] / n0):>20}"
            f"{100 * uplift:>+8.2f}{100 * truth:>+7.2f}{100 * (uplift - truth):>+7.2f}"
        )


def print_diagnosis(runs: list[Run]) -> None:
    """The cohorts with repeat selections pooled: repeats and first selections apart."""
    cohorts = [c for c in totals(runs) if c["repeat_n1"]]
    if not cohorts:
        return
    print(f"\ncohorts with repeat selections ({len(cohorts)}), pooled; contacted / control:")
    for name in ("repeat", "first"):
        n1, n0, xn = (sum(c[f"{name}_{k}"] for c in cohorts) for k in ("n1", "n0", "xn"))
        cf1, k0 = (sum(c[f"{name}_{k}"] for c in cohorts) for k in ("xcf", "k0"))
        p1, p0 = (sum(c[f"{name}_{k}"] for c in cohorts) for k in ("p1", "p0"))
        r1, r0 = (sum(c[f"{name}_{k}"] for c in cohorts) for k in ("r1", "r0"))
        print(
            f"  {SUBSETS[name]:<18} persuadable {100 * p1 / n1:.1f}% / {100 * p0 / n0:.1f}%, "
            f"risk {100 * r1 / n1:.1f}% / {100 * r0 / n0:.1f}%, cancelled without an email "
            f"{100 * cf1 / xn:.1f}% / {100 * k0 / n0:.1f}%: the control band's outcome "
            f"misses the contacted's by {100 * (k0 / n0 - cf1 / xn):+.2f} pp"
        )


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    setup = setup_of(args)
    began = time.monotonic()
    print(
        f"{args.worlds} worlds of {setup.customers:,} customers (seed {setup.seed}); price rise "
        f"on day {PRICE_RISE_DAY}, launch on day {demo.LAUNCH_DAY}; campaigns on days "
        f"{NIGHTS[0]} to {NIGHTS[-1]}, weekly ({len(NIGHTS)} cohorts)"
    )
    print(
        f"campaign: top {setup.audience_deciles} risk decile(s), capacity {setup.capacity:,}, "
        f"control fraction {setup.control_fraction:.0%}, suppression {setup.suppression_days} "
        f"days, outcome: cancelled within {setup.horizon} days; score: the true {setup.horizon}"
        f"-day no-email risk, logit + N(0, {setup.noise:g})"
    )
    tasks = [(i, setup) for i in range(args.worlds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            worlds = list(pool.map(run_world, tasks))
    else:
        worlds = [run_world(t) for t in tasks]
    runs = {effect: [w[effect] for w in worlds] for effect in setup.effects}
    for effect, effect_runs in runs.items():
        counts = [c for r in effect_runs for c in r.cohorts]
        print(
            f"{EFFECTS[effect]}: {sum(c['all_xn'] for c in counts):,.0f} of "
            f"{sum(c['all_n1'] for c in counts):,.0f} emails reached a customer still active"
        )
    print_summary(runs)
    shown = "real" if "real" in runs else "zero"
    if shown == "real":
        for name, label in SUBSETS.items():
            print_cohorts(runs["real"], name, f"{label}, {EFFECTS['real']}")
        print_diagnosis(runs["real"])
    print(f"\n({time.monotonic() - began:.0f} s, {args.jobs} process{'es' * (args.jobs > 1)})")
    if "zero" in runs:
        false = {name: summary(runs["zero"], name)["conclusive"] for name in ESTIMATORS}
        print(
            f"zero effect: the interval excludes 0 (false conclusive) in "
            f"{figures.percent(false['all'], 0.05)} of worlds with all contacts, "
            f"{figures.percent(false['first'], 0.05)} with first contacts (goal <= 5%)"
        )
    for name, label in (("all", "all contacts"), ("first", "uplift")):
        s = summary(runs[shown], name)
        print(
            f"{label}: coverage {figures.percent(s['coverage'], 0.95)}; bias "
            f"{100 * s['bias']:+.2f} pp; rmse {100 * s['rmse']:.2f} pp"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=30, help="seeded worlds (default 30)")
    ap.add_argument(
        "--customers", type=int, default=demo.DEMO_CUSTOMERS, help="customers per world"
    )
    ap.add_argument("--noise", type=float, default=0.5, help="score noise, sd on the logit scale")
    ap.add_argument("--zero-effect-only", action="store_true", help="only emails that do nothing")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)"
    )
    return run(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
