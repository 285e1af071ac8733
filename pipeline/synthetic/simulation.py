"""One simulated day of the telco: sign-ups, cancellations, fee changes, bills, usage, tickets.

The daily cancellation hazard is driven by behaviour a model can observe (falling usage,
overdue invoices, tickets, tenure, contract, recent price rises) plus seasonality, and
by the world's two drift events (``World.price_rise_day``, ``World.launch_day``). A
retention email sent to a customer shifts their hazard for a while, and the simulation
follows what they would have done without it. Every day's random draws come from
``default_rng([seed, day])`` in a fixed order, each drawn for every customer and picked
by index, so a day's facts depend on nothing but the state of its morning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, timedelta

import numpy as np

from pipeline.synthetic.facts import Buffers
from pipeline.synthetic.world import DE, EPOCH, NEVER, PL, PLAN_FEES, Sim

PRICE_RISE = 0.18


@dataclass(frozen=True)
class Day:
    """One simulated day.

    Attributes:
        t: its number, counted from the world's start.
        today: its date.
        epoch_day: its date as days since 1970-01-01 (the warehouse's dates).
        doy: its day of the year (the seasons).
    """

    t: int
    today: date
    epoch_day: int
    doy: int

    @classmethod
    def of(cls, sim: Sim) -> Day:
        """The day ``sim`` simulates next."""
        t = sim.day
        today = sim.world.start + timedelta(days=t)
        return cls(t, today, (sim.world.start - EPOCH).days + t, today.timetuple().tm_yday)


@dataclass(frozen=True)
class _Odds:
    """The active customers' cancellation log-odds today without any email, and their terms.

    ``act`` indexes the state's arrays and the other arrays are aligned with it, except
    ``overdue_all``: every customer's overdue invoices, indexed as the state's arrays.
    """

    act: np.ndarray
    overdue_all: np.ndarray
    overdue: np.ndarray
    logit: np.ndarray
    disengaged: np.ndarray
    rise: np.ndarray
    lured: np.ndarray

    def among(self, keep: np.ndarray) -> _Odds:
        """The same odds of the customers ``keep`` selects."""
        return replace(
            self,
            act=self.act[keep],
            overdue=self.overdue[keep],
            logit=self.logit[keep],
            disengaged=self.disengaged[keep],
            rise=self.rise[keep],
            lured=self.lured[keep],
        )


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function: log-odds to probabilities."""
    return 1.0 / (1.0 + np.exp(-x))


def cancel_logit(
    sim: Sim, idx: np.ndarray, day: Day, overdue: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The daily cancellation log-odds of customers ``idx`` on ``day`` without any email.

    Args:
        sim: the simulator state.
        idx: the customers (indices into the state's arrays).
        day: the day.
        overdue: each one's overdue invoices on the day.

    Returns:
        The log-odds, and the terms reused later that day: disengagement (0 to 1), the
        recent price rise's weight (1 on its day, fading) and the rival's lure.
    """
    a = sim.a
    t = day.t
    tenure = (t - a["signup_day"][idx]).astype(np.float64)
    disengaged = np.clip((t - a["disengage_day"][idx]) / 45.0, 0.0, 1.0)
    since_rise = (t - a["last_rise_day"][idx]).astype(np.float64)
    rise = np.exp(-since_rise / 75.0) * (since_rise >= 0)
    # From the launch day on, a rival's unlimited-data offer lures heavy data users away:
    # a new, lasting reason to leave that a model trained before it has never seen.
    lured = np.clip(np.log(a["base_data"][idx]) - 5.9, 0.0, 1.5) * (t >= sim.world.launch_day)
    contract_eff = np.array([0.9, -0.2, -1.1])[a["contract"][idx]]
    logit = (
        -8.1
        + contract_eff
        - 0.22 * np.log1p(tenure / 30.0)
        + 3.3 * disengaged
        + 0.75 * np.minimum(overdue, 3)
        + 0.5 * a["ticket_level"][idx]
        + 3.2 * a["price_sens"][idx] * rise
        + 0.25 * np.sin(2 * np.pi * (day.doy - 20) / 365)
        + 0.6 * (a["country"][idx] == PL)
        + 1.6 * lured
        + 0.25 * (a["channel"][idx] == 2)
    )
    return logit, disengaged, rise, lured


# -- how customers respond to a retention email ----------------------------------------
#
# For ``EMAIL_DAYS`` days from the day it is sent, an email shifts the customer's daily
# cancellation log-odds by their effect, fixed on that day:
#   * persuadable: price-sensitive for their contract (``price_sens`` >= 0.15 on a monthly
#     contract, >= 0.35 on an annual one, never on two years): the retention offer keeps
#     them, ``PERSUADED`` (a ninth of the hazard);
#   * sleeping dog: on a two-year contract and already drifting away (disengagement >=
#     0.5): the email reminds them to leave, ``SLEEPING_DOG`` (1.6 times the hazard);
#   * everyone else: indifferent, 0.
# Price sensitivity and disengagement are never in the warehouse; the model sees only
# their traces (contract type, complaints after a price rise, falling usage). The truth
# (each send's effect and what its customer would have done without it) is written to
# the schema ``<warehouse schema>_truth``, which no pipeline role can read.
EMAIL_DAYS = 30
TRUTH_DAYS = 60  # how long the counterfactual of a send is followed
PERSUADED = -2.2
SLEEPING_DOG = 0.5


def email_effect(sim: Sim, idx: np.ndarray, disengaged: np.ndarray) -> np.ndarray:
    """The log-odds shift an email sent today would give customers ``idx``."""
    a = sim.a
    persuadable = a["price_sens"][idx] >= np.array([0.15, 0.35, 2.0])[a["contract"][idx]]
    dog = (a["contract"][idx] == 2) & (disengaged >= 0.5)
    return np.where(persuadable, PERSUADED, 0.0) + np.where(dog, SLEEPING_DOG, 0.0)


def _contact(sim: Sim, day: Day, odds: _Odds) -> None:
    """Record today's sends (from the send log) and, on a day with sends, what an email
    would do to every active customer (for comparing targeting policies)."""
    t, act = day.t, odds.act
    sent = sim.sends.get(t)
    if sent is None:
        return
    effect = email_effect(sim, act, odds.disengaged)
    h0, h1 = sigmoid(odds.logit), sigmoid(odds.logit + effect)
    saved = (1 - h1) ** EMAIL_DAYS - (1 - h0) ** EMAIL_DAYS
    sim.effects.append(
        {"day": np.full(len(act), t, np.int32), "cust": act.astype(np.int32),
         "effect": effect.astype(np.float32), "saved": saved.astype(np.float32)}
    )  # fmt: skip
    idx = np.searchsorted(sim.a["customer_id"][: sim.n], sent)
    idx = idx[(idx < sim.n) & (sim.a["customer_id"][np.minimum(idx, sim.n - 1)] == sent)]
    pos = np.searchsorted(act, idx)
    here = pos < len(act)
    here[here] = act[pos[here]] == idx[here]
    pos = pos[here]  # only customers still active today can read an email
    x = sim.x
    new = {
        "cust": act[pos],
        "day": np.full(len(pos), t),
        "effect": effect[pos],
        "cf_day": np.full(len(pos), NEVER),
    }
    sim.x = {
        k: np.concatenate([x[k], np.asarray(new[k]).astype(tp)]) for k, tp in Sim.EXPOSURES.items()
    }


def _email_shift(sim: Sim, act: np.ndarray, t: int) -> np.ndarray | float:
    """Today's log-odds shift of the active customers: the effect of their latest email
    still within ``EMAIL_DAYS``; 0.0 for everyone when no email is."""
    x = sim.x
    live = (x["day"] <= t) & (t < x["day"] + EMAIL_DAYS)
    if not live.any():
        return 0.0
    order = np.argsort(x["day"][live], kind="stable")  # the latest email wins
    shift = np.zeros(sim.n)
    shift[x["cust"][live][order]] = x["effect"][live][order]
    return shift[act]


def _shadow(sim: Sim, day: Day, odds: _Odds, draw: np.ndarray) -> None:
    """Follow each send's counterfactual (no email from its day on) for ``TRUTH_DAYS``.

    The counterfactual customer leaves on the first day the day's draw falls under the
    hazard without the email. While the real customer is active it shares their draw (the
    same luck, so a persuaded customer who leaves anyway would also have left); after the
    real one left (a sleeping dog), it draws its own.
    """
    t, act = day.t, odds.act
    x = sim.x
    open_ = np.flatnonzero((x["cf_day"] == NEVER) & (x["day"] <= t) & (t < x["day"] + TRUTH_DAYS))
    if not len(open_):
        return
    cust = x["cust"][open_]
    pos = np.minimum(np.searchsorted(act, cust), max(len(act) - 1, 0))
    active = act[pos] == cust if len(act) else np.zeros(len(cust), bool)
    shared = np.empty(len(cust))
    base = np.empty(len(cust))
    shared[active], base[active] = draw[pos[active]], odds.logit[pos[active]]
    gone = cust[~active]
    if len(gone):
        shared[~active] = np.random.default_rng([sim.world.seed, t, 1]).random(len(gone))
        base[~active] = cancel_logit(sim, gone, day, odds.overdue_all[gone])[0]
    left = shared < sigmoid(base)
    x["cf_day"][open_[left]] = t


def _per_customer_poisson(
    rng: np.random.Generator, n: int, idx: np.ndarray, lam: np.ndarray
) -> np.ndarray:
    """Poisson draws for customers ``idx``, by inversion of each one's slot of an
    ``n``-long uniform draw (numpy's own Poisson draws nothing for a zero mean, which
    would shift everyone after it)."""
    u = rng.random(n)[idx]
    out = np.zeros(len(idx), dtype=np.int64)
    term = np.exp(-lam)
    cdf = term.copy()
    todo = np.flatnonzero(u > cdf)
    k = 0
    while len(todo):
        k += 1
        term[todo] *= lam[todo] / k
        cdf[todo] += term[todo]
        out[todo] += 1
        todo = todo[u[todo] > cdf[todo]]
    return out


def simulate_day(sim: Sim, out: Buffers) -> None:
    """Advance the simulation by one day, appending that day's facts to ``out``.

    Every draw about customers is drawn for all ``sim.n`` of them, whether or not anyone
    needs it today, and then picked by index, so that what happens to one customer never
    depends on who else is active: an email changes the facts of the customer sent it and
    of no one else (apart from the surrogate ids of invoices, tickets and subscriptions,
    numbered in order).
    """
    day = Day.of(sim)
    rng = np.random.default_rng([sim.world.seed, day.t])
    _sign_ups(sim, out, rng, day)
    stay = _cancellations(sim, out, rng, day, _odds(sim, day))
    _fee_changes(sim, out, rng, day, stay.act)
    _payments(sim, out, day)
    _invoices(sim, out, rng, day, stay.act)
    _usage(sim, out, rng, day, stay)
    _tickets(sim, out, rng, day, stay)
    sim.day += 1


def _sign_ups(sim: Sim, out: Buffers, rng: np.random.Generator, day: Day) -> None:
    """Sign-ups replace roughly the customers who leave; the launch adds Polish ones."""
    w, t = sim.world, day.t
    n_new = rng.poisson(
        w.customers * 0.0011 * (1 + 0.25 * np.sin(2 * np.pi * (day.doy - 240) / 365))
    )
    idx_new = sim.add_customers(rng, n_new, np.full(n_new, t))
    if t >= w.launch_day:
        n_pl = rng.poisson(w.customers * (0.004 if t < w.launch_day + 30 else 0.0008))
        idx_new = np.concatenate(
            [idx_new, sim.add_customers(rng, n_pl, np.full(n_pl, t), np.full(n_pl, PL))]
        )
    if len(idx_new):
        _customer_rows(sim, out, idx_new)
        _subscription_rows(sim, out, idx_new, day.epoch_day, reason=0)


def _odds(sim: Sim, day: Day) -> _Odds:
    """The active customers' odds of cancelling today, counting invoices due before today
    and not yet paid as overdue."""
    act = np.flatnonzero(sim.a["active"][: sim.n])
    p = sim.p
    overdue_all = np.bincount(p["cust"][p["due_day"] < day.t], minlength=sim.n)
    overdue = overdue_all[act]
    logit, disengaged, rise, lured = cancel_logit(sim, act, day, overdue)
    return _Odds(act, overdue_all, overdue, logit, disengaged, rise, lured)


def _cancellations(
    sim: Sim, out: Buffers, rng: np.random.Generator, day: Day, odds: _Odds
) -> _Odds:
    """Who leaves today, first of the day's events: a customer who leaves today has no
    usage today. Returns the odds of the customers who stay."""
    a, act = sim.a, odds.act
    _contact(sim, day, odds)
    draw = rng.random(sim.n)[act]
    reason_draw = rng.integers(1, 5, sim.n)  # drawn whether or not anyone leaves
    leaves = draw < sigmoid(odds.logit + _email_shift(sim, act, day.t))
    _shadow(sim, day, odds, draw)
    gone = act[leaves]
    if len(gone):
        a["active"][gone] = False
        reason = np.where(
            odds.rise[leaves] > 0.2,
            0,
            np.where(
                (odds.disengaged[leaves] > 0.3) | (odds.lured[leaves] > 0.5), 2, reason_draw[gone]
            ),
        )
        out.add(
            "cancellations",
            customer_id=a["customer_id"][gone],
            cancel_date=np.full(len(gone), day.epoch_day),
            reason=reason,
        )
    return odds.among(~leaves)


def _fee_changes(
    sim: Sim, out: Buffers, rng: np.random.Generator, day: Day, act: np.ndarray
) -> None:
    """Fee changes of the active customers ``act``: the price rise and occasional plan changes."""
    a = sim.a
    if day.t == sim.world.price_rise_day:
        de = act[a["country"][act] == DE]
        a["fee"][de] *= 1 + PRICE_RISE
        a["last_rise_day"][de] = day.t
        _subscription_rows(sim, out, de, day.epoch_day, reason=2)
    movers = act[rng.random(sim.n)[act] < 0.0007]
    step = rng.choice([-1, 1], sim.n)
    if len(movers):
        a["plan"][movers] = np.clip(a["plan"][movers] + step[movers], 0, 3)
        a["fee"][movers] = PLAN_FEES[a["plan"][movers]] * np.where(
            a["last_rise_day"][movers] > -NEVER, 1 + PRICE_RISE, 1.0
        )
        _subscription_rows(sim, out, movers, day.epoch_day, reason=1)


def _payments(sim: Sim, out: Buffers, day: Day) -> None:
    """The payments that happen today, which settle their invoices."""
    p = sim.p
    paying = p["pay_day"] == day.t
    if paying.any():
        out.add(
            "payments",
            invoice_id=p["invoice_id"][paying],
            customer_id=sim.a["customer_id"][p["cust"][paying]],
            payment_date=np.full(int(paying.sum()), day.epoch_day),
            amount=p["amount"][paying],
        )
        sim.p = {k: v[~paying] for k, v in p.items()}


def _invoices(sim: Sim, out: Buffers, rng: np.random.Generator, day: Day, act: np.ndarray) -> None:
    """Today's invoices of the active customers ``act`` billed on this day of the month,
    due in 14 days; stressed customers pay late or never."""
    a, n, t = sim.a, sim.n, day.t
    billed = act[a["bill_dom"][act] == day.today.day]
    late_draw, never_draw = rng.random(n), rng.random(n)
    wait_late, wait_on_time = rng.geometric(1 / 12, n), rng.integers(1, 14, n)
    if not len(billed):
        return
    stress = a["stress"][billed]
    late = late_draw[billed] < 0.03 + 0.9 * stress**2
    never = never_draw[billed] < 0.004 + 0.05 * stress
    pay_day = np.where(late, t + 14 + wait_late[billed], t + wait_on_time[billed])
    pay_day = np.where(never, NEVER, pay_day).astype(np.int32)
    ids = sim.take_ids("invoice", len(billed))
    amount = a["fee"][billed]
    out.add(
        "invoices",
        invoice_id=ids,
        customer_id=a["customer_id"][billed],
        issue_date=np.full(len(billed), day.epoch_day),
        due_date=np.full(len(billed), day.epoch_day + 14),
        amount=amount,
    )
    new_pending = {
        "invoice_id": ids,
        "cust": billed,
        "due_day": np.full(len(billed), t + 14),
        "pay_day": pay_day,
        "amount": amount,
    }
    sim.p = {
        k: np.concatenate([sim.p[k], np.asarray(new_pending[k]).astype(t_)])
        for k, t_ in Sim.PENDING.items()
    }


def _usage(sim: Sim, out: Buffers, rng: np.random.Generator, day: Day, stay: _Odds) -> None:
    """Daily usage: falls as a customer disengages; weekends and summer are busier."""
    a, n, act = sim.a, sim.n, stay.act
    season = 1 + 0.08 * np.sin(2 * np.pi * (day.doy - 200) / 365) + 0.1 * (day.today.weekday() >= 5)
    used = rng.random(n)[act] < 0.95 - 0.6 * stay.disengaged
    u = act[used]
    fade = 1 - 0.75 * stay.disengaged[used]
    minutes = a["base_minutes"][u] * fade * season * rng.lognormal(0, 0.35, n)[u]
    data_mb = a["base_data"][u] * fade * season * rng.lognormal(0, 0.5, n)[u]
    out.add(
        "usage_daily",
        customer_id=a["customer_id"][u],
        usage_date=np.full(len(u), day.epoch_day),
        minutes=np.rint(minutes),
        data_mb=np.rint(data_mb),
        sessions=1 + _per_customer_poisson(rng, n, u, minutes / 25.0),
    )


def _tickets(sim: Sim, out: Buffers, rng: np.random.Generator, day: Day, stay: _Odds) -> None:
    """Support tickets: disengaging, overdue or recently re-priced customers complain more."""
    a, n, act = sim.a, sim.n, stay.act
    rate = (
        0.0015
        + 0.02 * stay.disengaged
        + 0.03 * stay.rise * a["price_sens"][act]
        + 0.004 * (stay.overdue > 0)
    )
    opened = rng.random(n)[act] < rate
    category_draw = rng.choice(4, n, p=[0.35, 0.35, 0.25, 0.05])
    tk = act[opened]
    a["ticket_level"][act] *= np.float32(np.exp(-1 / 20))
    if len(tk):
        a["ticket_level"][tk] += 1
        category = np.where(
            stay.disengaged[opened] > 0.5,
            3,
            np.where(stay.rise[opened] > 0.2, 0, category_draw[tk]),
        )
        out.add(
            "tickets",
            ticket_id=sim.take_ids("ticket", len(tk)),
            customer_id=a["customer_id"][tk],
            opened_date=np.full(len(tk), day.epoch_day),
            category=category,
        )


def _customer_rows(sim: Sim, out: Buffers, idx: np.ndarray) -> None:
    """The ``customers`` rows of customers ``idx``."""
    a = sim.a
    epoch0 = (sim.world.start - EPOCH).days
    out.add(
        "customers",
        customer_id=a["customer_id"][idx],
        signup_date=a["signup_day"][idx] + epoch0,
        country=a["country"][idx],
        channel=a["channel"][idx],
        contract_type=a["contract"][idx],
        marketing_opt_in=a["opt_in"][idx],
        first_name=a["name"][idx],
        email=a["customer_id"][idx],
    )


def _subscription_rows(
    sim: Sim, out: Buffers, idx: np.ndarray, epoch_day: int, reason: int
) -> None:
    """The ``subscriptions`` rows of customers ``idx``'s plan and fee from ``epoch_day``."""
    if len(idx):
        out.add(
            "subscriptions",
            subscription_id=sim.take_ids("subscription", len(idx)),
            customer_id=sim.a["customer_id"][idx],
            plan_id=sim.a["plan"][idx],
            monthly_fee=sim.a["fee"][idx],
            valid_from=np.full(len(idx), epoch_day),
            change_reason=np.full(len(idx), reason),
        )


def initial_population(sim: Sim, out: Buffers) -> None:
    """Sign up the world's initial customers, before its first day (tenure up to ~6 years).

    Args:
        sim: a state that has simulated no day yet.
        out: receives their ``customers`` and ``subscriptions`` rows.
    """
    rng = np.random.default_rng([sim.world.seed, 2**31])
    n = sim.world.customers
    signup = -(rng.exponential(700.0, n).astype(np.int32) % 2200) - 1
    idx = sim.add_customers(rng, n, np.sort(signup)[::-1].copy())
    epoch0 = (sim.world.start - EPOCH).days
    a = sim.a
    _customer_rows(sim, out, idx)
    out.add(
        "subscriptions",
        subscription_id=sim.take_ids("subscription", n),
        customer_id=a["customer_id"][idx],
        plan_id=a["plan"][idx],
        monthly_fee=a["fee"][idx],
        valid_from=a["signup_day"][idx] + epoch0,
        change_reason=np.zeros(n, dtype=np.int64),
    )
