"""The synthetic telco warehouse: a deterministic, vectorized simulation bulk-loaded by COPY.

Customers sign up, use the network every day, get invoiced monthly and pay (some late),
open support tickets, see their fees change and cancel. The daily cancellation hazard is
driven by behaviour a model can observe (falling usage, overdue invoices, tickets, tenure,
contract, recent price rises) plus seasonality, and two drift events shift it mid-history:

* ``price_rise_day``: every German customer's fee rises 18%; price-sensitive ones leave.
* ``launch_day``: the network launches in Poland (the new customers churn more) and a
  rival's unlimited-data offer starts luring heavy data users away for good.

Every day's random draws come from ``default_rng([seed, day])``, and the whole simulator
state is saved with the data, so ``advance`` continues exactly where ``seed`` stopped:
seeding K1 days then advancing to K2 gives the same warehouse as seeding K2 days.
The loop runs over days (a few hundred), never over customers.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.conf.config import Settings
from pipeline.core import progress
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.paths import SQL_DIR
from pipeline.store import db

log = logging.getLogger(__name__)

EPOCH = date(1970, 1, 1)
NEVER = np.int32(2**30)

COUNTRIES = np.array(["GB", "DE", "FR", "ES", "IT", "PL"])
COUNTRY_WEIGHTS = np.array([0.34, 0.24, 0.18, 0.13, 0.11, 0.0])
DE, PL = 1, 5
CHANNELS = np.array(["web", "store", "partner", "telesales"])
CHANNEL_WEIGHTS = np.array([0.45, 0.3, 0.15, 0.1])
CONTRACTS = np.array(["monthly", "annual", "two_year"])
CONTRACT_WEIGHTS = np.array([0.5, 0.32, 0.18])
PLAN_NAMES = np.array(["Basic", "Plus", "Max", "Unlimited"])
PLAN_FEES = np.array([12.0, 20.0, 32.0, 45.0])
PLAN_DATA_GB = np.array([5, 20, 100, 999])
PLAN_WEIGHTS = np.array([0.3, 0.35, 0.23, 0.12])
TICKET_CATEGORIES = np.array(["billing", "network", "device", "cancellation_request"])
CANCEL_REASONS = np.array(["price", "service", "competitor", "moved", "other"])
FIRST_NAMES = np.array(
    [
        "Alex", "Sam", "Maria", "Jan", "Lena", "Omar", "Chloe", "Luca", "Sofia", "Noah",
        "Emma", "Pavel", "Ines", "Hugo", "Ada", "Marta", "Tom", "Zoe", "Karl", "Anna",
    ]
)  # fmt: skip

FLUSH_DAYS = 30
PRICE_RISE = 0.18


@dataclass(frozen=True)
class SeedResult:
    customers: int
    start: date
    through: date
    rows: dict[str, int]
    seconds: float


class _Sim:
    """The simulator state: one numpy array per customer attribute, grown as people sign up."""

    ARRAYS: ClassVar[dict[str, Any]] = {
        "customer_id": np.int32,
        "signup_day": np.int32,
        "country": np.int8,
        "channel": np.int8,
        "contract": np.int8,
        "opt_in": np.bool_,
        "name": np.int16,
        "plan": np.int8,
        "fee": np.float64,
        "price_sens": np.float32,
        "stress": np.float32,
        "base_minutes": np.float32,
        "base_data": np.float32,
        "disengage_day": np.int32,
        "active": np.bool_,
        "last_rise_day": np.int32,
        "ticket_level": np.float32,
        "bill_dom": np.int8,
    }
    PENDING: ClassVar[dict[str, Any]] = {
        "invoice_id": np.int64,
        "cust": np.int32,
        "due_day": np.int32,
        "pay_day": np.int32,
        "amount": np.float64,
    }

    EXPOSURES: ClassVar[dict[str, Any]] = {
        "cust": np.int32,  # who was sent an email (index into the arrays above)
        "day": np.int32,  # on which day
        "effect": np.float32,  # its log-odds shift (see email_effect)
        "cf_day": np.int32,  # when they would have left without it (NEVER: not by TRUTH_DAYS)
    }

    def __init__(
        self, seed: int, start: date, customers: int, price_rise_day: int, launch_day: int
    ):
        self.seed = seed
        self.start = start
        self.n_initial = customers
        self.price_rise_day = price_rise_day
        self.launch_day = launch_day
        self.day = 0  # next day to simulate
        self.n = 0
        self.next_ids = {"customer": 1, "invoice": 1, "ticket": 1, "subscription": 1}
        self.a = {k: np.zeros(0, dtype=t) for k, t in self.ARRAYS.items()}
        self.p = {k: np.zeros(0, dtype=t) for k, t in self.PENDING.items()}
        self.x = {k: np.zeros(0, dtype=t) for k, t in self.EXPOSURES.items()}
        self.sends: dict[int, np.ndarray] = {}  # day -> customer ids sent an email that day
        self.effects: list[dict[str, np.ndarray]] = []  # per day with sends, not persisted

    # -- persistence -------------------------------------------------------------------
    def dumps(self) -> bytes:
        buf = io.BytesIO()
        meta = np.array(
            [self.seed, self.n_initial, self.price_rise_day, self.launch_day, self.day, self.n]
            + [self.next_ids[k] for k in ("customer", "invoice", "ticket", "subscription")],
            dtype=np.int64,
        )
        arrays: dict[str, Any] = {f"a_{k}": v[: self.n] for k, v in self.a.items()}
        arrays |= {f"p_{k}": v for k, v in self.p.items()}
        arrays |= {f"x_{k}": v for k, v in self.x.items()}
        arrays |= {"meta": meta, "start": np.array([(self.start - EPOCH).days])}
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def loads(cls, blob: bytes) -> _Sim:
        z = np.load(io.BytesIO(blob))
        m = [int(x) for x in z["meta"]]
        sim = cls(m[0], EPOCH + timedelta(days=int(z["start"][0])), m[1], m[2], m[3])
        sim.day, sim.n = m[4], m[5]
        sim.next_ids = dict(
            zip(("customer", "invoice", "ticket", "subscription"), m[6:], strict=True)
        )
        sim.a = {k: z[f"a_{k}"].astype(t) for k, t in cls.ARRAYS.items()}
        sim.p = {k: z[f"p_{k}"].astype(t) for k, t in cls.PENDING.items()}
        if "x_cust" in z:  # states saved before emails had effects have none
            sim.x = {k: z[f"x_{k}"].astype(t) for k, t in cls.EXPOSURES.items()}
        return sim

    # -- population ------------------------------------------------------------------
    def add_customers(
        self,
        rng: np.random.Generator,
        count: int,
        signup_days: np.ndarray,
        country: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append ``count`` customers; returns their indices."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        new = {
            "customer_id": np.arange(
                self.next_ids["customer"], self.next_ids["customer"] + count, dtype=np.int32
            ),
            "signup_day": signup_days.astype(np.int32),
            "country": country
            if country is not None
            else rng.choice(len(COUNTRIES), count, p=COUNTRY_WEIGHTS),
            "channel": rng.choice(len(CHANNELS), count, p=CHANNEL_WEIGHTS),
            "contract": rng.choice(len(CONTRACTS), count, p=CONTRACT_WEIGHTS),
            "opt_in": rng.random(count) < 0.68,
            "name": rng.integers(0, len(FIRST_NAMES), count),
            "plan": rng.choice(len(PLAN_NAMES), count, p=PLAN_WEIGHTS),
            "price_sens": rng.beta(2.0, 5.0, count),
            "stress": rng.beta(1.5, 8.0, count),
            "base_minutes": rng.lognormal(3.2, 0.6, count),
            "base_data": rng.lognormal(5.5, 0.8, count),
            "active": np.ones(count, dtype=bool),
            "last_rise_day": np.full(count, -NEVER, dtype=np.int32),
            "ticket_level": np.zeros(count),
            "bill_dom": rng.integers(1, 29, count),
        }
        new["fee"] = PLAN_FEES[new["plan"]]
        # A third of customers drift away at some point: usage falls, then they leave.
        drifts = rng.random(count) < 0.35
        onset = signup_days + rng.exponential(420.0, count).astype(np.int32) + 30
        new["disengage_day"] = np.where(drifts, onset, NEVER)
        self.next_ids["customer"] += count
        idx = np.arange(self.n, self.n + count)
        self.n += count
        for k, t in self.ARRAYS.items():
            arr = self.a[k]
            if len(arr) < self.n:
                grown = np.zeros(max(self.n, int(len(arr) * 1.3) + 1024), dtype=t)
                grown[: len(arr)] = arr
                self.a[k] = arr = grown
            arr[idx] = np.asarray(new[k]).astype(t)
        return idx

    def take_ids(self, kind: str, count: int) -> np.ndarray:
        first = self.next_ids[kind]
        self.next_ids[kind] += count
        return np.arange(first, first + count, dtype=np.int64)


class _Buffers:
    """Rows produced by the simulation, flushed to the warehouse as Arrow tables."""

    def __init__(self) -> None:
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {}

    def add(self, table: str, **cols: np.ndarray) -> None:
        if len(next(iter(cols.values()))):
            self.parts.setdefault(table, []).append(cols)

    def drain(self) -> dict[str, pa.Table]:
        out = {}
        for table, parts in self.parts.items():
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            out[table] = _to_arrow(table, cols)
        self.parts = {}
        return out


_SCHEMAS: dict[str, dict[str, Callable[[np.ndarray], pa.Array]]] = {}


def _days(v: np.ndarray) -> pa.Array:
    return pa.array(v.astype(np.int32)).cast(pa.date32())


def _money(v: np.ndarray) -> pa.Array:
    return pa.array(np.round(v, 2)).cast(pa.decimal128(10, 2))


def _labels(values: np.ndarray) -> Callable[[np.ndarray], pa.Array]:
    dictionary = pa.array(values)
    return lambda codes: pa.DictionaryArray.from_arrays(
        pa.array(codes.astype(np.int32)), dictionary
    ).cast(pa.string())


def _int(t: Any) -> Callable[[np.ndarray], pa.Array]:
    return lambda v: pa.array(v.astype(t))


_SCHEMAS.update(
    customers={
        "customer_id": _int(np.int32),
        "signup_date": _days,
        "country": _labels(COUNTRIES),
        "channel": _labels(CHANNELS),
        "contract_type": _labels(CONTRACTS),
        "marketing_opt_in": lambda v: pa.array(v.astype(bool)),
        "first_name": _labels(FIRST_NAMES),
        "email": lambda ids: pa.array(
            np.char.add(np.char.add("customer", ids.astype(str)), "@example.com")
        ),
    },
    subscriptions={
        "subscription_id": _int(np.int64),
        "customer_id": _int(np.int32),
        "plan_id": lambda v: pa.array((v + 1).astype(np.int16)),
        "monthly_fee": _money,
        "valid_from": _days,
        "change_reason": _labels(np.array(["signup", "plan_change", "price_rise"])),
    },
    usage_daily={
        "customer_id": _int(np.int32),
        "usage_date": _days,
        "minutes": _int(np.int32),
        "data_mb": _int(np.int32),
        "sessions": _int(np.int16),
    },
    invoices={
        "invoice_id": _int(np.int64),
        "customer_id": _int(np.int32),
        "issue_date": _days,
        "due_date": _days,
        "amount": _money,
    },
    payments={
        "invoice_id": _int(np.int64),
        "customer_id": _int(np.int32),
        "payment_date": _days,
        "amount": _money,
    },
    tickets={
        "ticket_id": _int(np.int64),
        "customer_id": _int(np.int32),
        "opened_date": _days,
        "category": _labels(TICKET_CATEGORIES),
    },
    cancellations={
        "customer_id": _int(np.int32),
        "cancel_date": _days,
        "reason": _labels(CANCEL_REASONS),
    },
)

TABLE_ORDER = (
    "customers",
    "subscriptions",
    "usage_daily",
    "invoices",
    "payments",
    "tickets",
    "cancellations",
)


def _to_arrow(table: str, cols: dict[str, np.ndarray]) -> pa.Table:
    spec = _SCHEMAS[table]
    return pa.table({name: conv(cols[name]) for name, conv in spec.items()})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cancel_logit(
    sim: _Sim, idx: np.ndarray, t: int, doy: int, overdue: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The daily cancellation log-odds of customers ``idx`` on day ``t`` without any email,
    and the terms reused later that day (disengagement, recent price rise, rival's lure)."""
    a = sim.a
    tenure = (t - a["signup_day"][idx]).astype(np.float64)
    disengaged = np.clip((t - a["disengage_day"][idx]) / 45.0, 0.0, 1.0)
    since_rise = (t - a["last_rise_day"][idx]).astype(np.float64)
    rise = np.exp(-since_rise / 75.0) * (since_rise >= 0)
    # From the launch day on, a rival's unlimited-data offer lures heavy data users away:
    # a new, lasting reason to leave that a model trained before it has never seen.
    lured = np.clip(np.log(a["base_data"][idx]) - 5.9, 0.0, 1.5) * (t >= sim.launch_day)
    contract_eff = np.array([0.9, -0.2, -1.1])[a["contract"][idx]]
    logit = (
        -8.1
        + contract_eff
        - 0.22 * np.log1p(tenure / 30.0)
        + 3.3 * disengaged
        + 0.75 * np.minimum(overdue, 3)
        + 0.5 * a["ticket_level"][idx]
        + 3.2 * a["price_sens"][idx] * rise
        + 0.25 * np.sin(2 * np.pi * (doy - 20) / 365)
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


def email_effect(sim: _Sim, idx: np.ndarray, disengaged: np.ndarray) -> np.ndarray:
    """The log-odds shift an email sent today would give customers ``idx``."""
    a = sim.a
    persuadable = a["price_sens"][idx] >= np.array([0.15, 0.35, 2.0])[a["contract"][idx]]
    dog = (a["contract"][idx] == 2) & (disengaged >= 0.5)
    return np.where(persuadable, PERSUADED, 0.0) + np.where(dog, SLEEPING_DOG, 0.0)


def _contact(sim: _Sim, act: np.ndarray, t: int, logit: np.ndarray, disengaged: np.ndarray) -> None:
    """Record today's sends (from the send log) and, on a day with sends, what an email
    would do to every active customer (for comparing targeting policies)."""
    sent = sim.sends.get(t)
    if sent is None:
        return
    effect = email_effect(sim, act, disengaged)
    h0, h1 = _sigmoid(logit), _sigmoid(logit + effect)
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
        k: np.concatenate([x[k], np.asarray(new[k]).astype(tp)]) for k, tp in _Sim.EXPOSURES.items()
    }


def _email_shift(sim: _Sim, act: np.ndarray, t: int) -> np.ndarray | float:
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


def _shadow(
    sim: _Sim,
    act: np.ndarray,
    t: int,
    doy: int,
    overdue_all: np.ndarray,
    u: np.ndarray,
    logit: np.ndarray,
) -> None:
    """Follow each send's counterfactual (no email from its day on) for ``TRUTH_DAYS``.

    The counterfactual customer leaves on the first day the day's draw falls under the
    hazard without the email. While the real customer is active it shares their draw (the
    same luck, so a persuaded customer who leaves anyway would also have left); after the
    real one left (a sleeping dog), it draws its own.
    """
    x = sim.x
    open_ = np.flatnonzero((x["cf_day"] == NEVER) & (x["day"] <= t) & (t < x["day"] + TRUTH_DAYS))
    if not len(open_):
        return
    cust = x["cust"][open_]
    pos = np.minimum(np.searchsorted(act, cust), max(len(act) - 1, 0))
    active = act[pos] == cust if len(act) else np.zeros(len(cust), bool)
    draw = np.empty(len(cust))
    base = np.empty(len(cust))
    draw[active], base[active] = u[pos[active]], logit[pos[active]]
    gone = cust[~active]
    if len(gone):
        draw[~active] = np.random.default_rng([sim.seed, t, 1]).random(len(gone))
        base[~active] = _cancel_logit(sim, gone, t, doy, overdue_all[gone])[0]
    left = draw < _sigmoid(base)
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


def _simulate_day(sim: _Sim, out: _Buffers) -> None:
    """Advance the simulation by one day, appending that day's facts to ``out``.

    Every draw about customers is drawn for all ``sim.n`` of them, whether or not anyone
    needs it today, and then picked by index, so that what happens to one customer never depends on who else is active:
    an email changes the facts of the customer sent it and of no one else (apart from
    the surrogate ids of invoices, tickets and subscriptions, numbered in order).
    """
    t = sim.day
    epoch_day = (sim.start - EPOCH).days + t
    today = sim.start + timedelta(days=t)
    doy = today.timetuple().tm_yday
    rng = np.random.default_rng([sim.seed, t])

    # Sign-ups replace roughly the customers who leave; the launch adds Polish ones.
    n_new = rng.poisson(sim.n_initial * 0.0011 * (1 + 0.25 * np.sin(2 * np.pi * (doy - 240) / 365)))
    idx_new = sim.add_customers(rng, n_new, np.full(n_new, t))
    if t >= sim.launch_day:
        n_pl = rng.poisson(sim.n_initial * (0.004 if t < sim.launch_day + 30 else 0.0008))
        idx_new = np.concatenate(
            [idx_new, sim.add_customers(rng, n_pl, np.full(n_pl, t), np.full(n_pl, PL))]
        )
    a = sim.a
    if len(idx_new):
        out.add(
            "customers",
            customer_id=a["customer_id"][idx_new],
            signup_date=a["signup_day"][idx_new] + (epoch_day - t),
            country=a["country"][idx_new],
            channel=a["channel"][idx_new],
            contract_type=a["contract"][idx_new],
            marketing_opt_in=a["opt_in"][idx_new],
            first_name=a["name"][idx_new],
            email=a["customer_id"][idx_new],
        )
        _subscription_rows(sim, out, idx_new, epoch_day, reason=0)

    n = sim.n
    act = np.flatnonzero(a["active"][:n])

    # Overdue invoices as of today (due before today, not yet paid).
    p = sim.p
    overdue_all = np.bincount(p["cust"][p["due_day"] < t], minlength=n)
    overdue = overdue_all[act]
    # Cancellations first: a customer who leaves today has no usage today.
    logit, disengaged, rise, lured = _cancel_logit(sim, act, t, doy, overdue)
    _contact(sim, act, t, logit, disengaged)
    draw = rng.random(n)[act]
    reason_draw = rng.integers(1, 5, n)  # drawn whether or not anyone leaves
    leaves = draw < _sigmoid(logit + _email_shift(sim, act, t))
    _shadow(sim, act, t, doy, overdue_all, draw, logit)
    gone = act[leaves]
    if len(gone):
        a["active"][gone] = False
        reason = np.where(
            rise[leaves] > 0.2,
            0,
            np.where((disengaged[leaves] > 0.3) | (lured[leaves] > 0.5), 2, reason_draw[gone]),
        )
        out.add(
            "cancellations",
            customer_id=a["customer_id"][gone],
            cancel_date=np.full(len(gone), epoch_day),
            reason=reason,
        )
    keep = ~leaves
    act, overdue, disengaged, rise = act[keep], overdue[keep], disengaged[keep], rise[keep]

    # Fee changes: the drift event and occasional plan changes.
    if t == sim.price_rise_day:
        de = act[a["country"][act] == DE]
        a["fee"][de] *= 1 + PRICE_RISE
        a["last_rise_day"][de] = t
        _subscription_rows(sim, out, de, epoch_day, reason=2)
    movers = act[rng.random(n)[act] < 0.0007]
    step = rng.choice([-1, 1], n)
    if len(movers):
        a["plan"][movers] = np.clip(a["plan"][movers] + step[movers], 0, 3)
        a["fee"][movers] = PLAN_FEES[a["plan"][movers]] * np.where(
            a["last_rise_day"][movers] > -NEVER, 1 + PRICE_RISE, 1.0
        )
        _subscription_rows(sim, out, movers, epoch_day, reason=1)

    # Payments that happen today, then today's invoices.
    paying = p["pay_day"] == t
    if paying.any():
        out.add(
            "payments",
            invoice_id=p["invoice_id"][paying],
            customer_id=a["customer_id"][p["cust"][paying]],
            payment_date=np.full(int(paying.sum()), epoch_day),
            amount=p["amount"][paying],
        )
        sim.p = p = {k: v[~paying] for k, v in p.items()}
    billed = act[a["bill_dom"][act] == today.day]
    late_draw, never_draw = rng.random(n), rng.random(n)
    wait_late, wait_on_time = rng.geometric(1 / 12, n), rng.integers(1, 14, n)
    if len(billed):
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
            issue_date=np.full(len(billed), epoch_day),
            due_date=np.full(len(billed), epoch_day + 14),
            amount=amount,
        )
        new_pending = {
            "invoice_id": ids,
            "cust": billed,
            "due_day": np.full(len(billed), t + 14),
            "pay_day": pay_day,
            "amount": amount,
        }
        sim.p = p = {
            k: np.concatenate([p[k], np.asarray(new_pending[k]).astype(t_)])
            for k, t_ in _Sim.PENDING.items()
        }

    # Daily usage: falls as a customer disengages; weekends and summer are busier.
    season = 1 + 0.08 * np.sin(2 * np.pi * (doy - 200) / 365) + 0.1 * (today.weekday() >= 5)
    used = rng.random(n)[act] < 0.95 - 0.6 * disengaged
    u = act[used]
    fade = 1 - 0.75 * disengaged[used]
    minutes = a["base_minutes"][u] * fade * season * rng.lognormal(0, 0.35, n)[u]
    data_mb = a["base_data"][u] * fade * season * rng.lognormal(0, 0.5, n)[u]
    out.add(
        "usage_daily",
        customer_id=a["customer_id"][u],
        usage_date=np.full(len(u), epoch_day),
        minutes=np.rint(minutes),
        data_mb=np.rint(data_mb),
        sessions=1 + _per_customer_poisson(rng, n, u, minutes / 25.0),
    )

    # Support tickets: disengaging, overdue or recently re-priced customers complain more.
    rate = 0.0015 + 0.02 * disengaged + 0.03 * rise * a["price_sens"][act] + 0.004 * (overdue > 0)
    opened = rng.random(n)[act] < rate
    category_draw = rng.choice(4, n, p=[0.35, 0.35, 0.25, 0.05])
    tk = act[opened]
    a["ticket_level"][act] *= np.float32(np.exp(-1 / 20))
    if len(tk):
        a["ticket_level"][tk] += 1
        category = np.where(
            disengaged[opened] > 0.5,
            3,
            np.where(rise[opened] > 0.2, 0, category_draw[tk]),
        )
        out.add(
            "tickets",
            ticket_id=sim.take_ids("ticket", len(tk)),
            customer_id=a["customer_id"][tk],
            opened_date=np.full(len(tk), epoch_day),
            category=category,
        )
    sim.day += 1


def _subscription_rows(
    sim: _Sim, out: _Buffers, idx: np.ndarray, epoch_day: int, reason: int
) -> None:
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


def _initial_population(sim: _Sim, out: _Buffers) -> None:
    """Customers who signed up before the first simulated day (tenure up to ~6 years)."""
    rng = np.random.default_rng([sim.seed, 2**31])
    n = sim.n_initial
    signup = -(rng.exponential(700.0, n).astype(np.int32) % 2200) - 1
    idx = sim.add_customers(rng, n, np.sort(signup)[::-1].copy())
    epoch0 = (sim.start - EPOCH).days
    a = sim.a
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
    out.add(
        "subscriptions",
        subscription_id=sim.take_ids("subscription", n),
        customer_id=a["customer_id"][idx],
        plan_id=a["plan"][idx],
        monthly_fee=a["fee"][idx],
        valid_from=a["signup_day"][idx] + epoch0,
        change_reason=np.zeros(n, dtype=np.int64),
    )


class _Writer:
    """COPYs Arrow tables on a background thread while the simulation computes the next days."""

    def __init__(self, url: str, schema: str):
        self.url, self.schema = url, schema
        self.rows: dict[str, int] = dict.fromkeys(TABLE_ORDER, 0)
        self.q: queue.Queue[dict[str, pa.Table] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="warehouse-copy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = db.adbc_connect(self.url)
        try:
            cur = conn.cursor()
            while (batch := self.q.get()) is not None:
                if self.error is None:
                    for name in TABLE_ORDER:
                        if name in batch:
                            cur.adbc_ingest(
                                name, batch[name], mode="append", db_schema_name=self.schema
                            )
                            self.rows[name] += batch[name].num_rows
                    conn.commit()
        except BaseException as exc:  # handed to the main thread in close()
            self.error = exc
            while self.q.get() is not None:
                pass
        finally:
            conn.close()

    def put(self, batch: dict[str, pa.Table]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(batch)

    def close(self) -> dict[str, int]:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.rows


def _run(settings: Settings, sim: _Sim, through_day: int, initial: bool) -> dict[str, int]:
    out = _Buffers()
    writer = _Writer(settings.warehouse_url, settings.warehouse_schema)
    with progress.stage("simulate_days", total=through_day - sim.day + 1, unit="days") as days:
        try:
            if initial:
                _initial_population(sim, out)
            started = time.monotonic()
            while sim.day <= through_day:
                _simulate_day(sim, out)
                days.advance()
                if sim.day % FLUSH_DAYS == 0 or sim.day > through_day:
                    writer.put(out.drain())
                    log.info(
                        "warehouse simulated through %s (%d customers so far, %.0fs)",
                        sim.start + timedelta(days=sim.day - 1),
                        sim.n,
                        time.monotonic() - started,
                    )
        finally:
            rows = writer.close()  # waits for the last COPY, inside the stage's time
    return rows


def _checked_schema(schema: str) -> str:
    """The warehouse schema name, refused unless it is a plain identifier."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", schema):
        raise ConfigError(
            f"warehouse schema: expected a plain identifier (letters, digits, _), found {schema!r}"
        )
    return schema


def _schema_conn(settings: Settings) -> Any:
    conn = db.connect(settings.warehouse_url)
    with conn.cursor() as cur:
        schema = db.quote_ident(_checked_schema(settings.warehouse_schema))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        cur.execute(f"SET search_path TO {schema}")
    return conn


def _save_state(settings: Settings, sim: _Sim) -> None:
    """Store the generator's state (for ``advance``), then index and analyze the tables."""
    with progress.stage("index_and_analyze"):
        conn = _schema_conn(settings)
        try:
            with conn.cursor() as cur:
                cur.execute("TRUNCATE generator_state")
                cur.execute(
                    "INSERT INTO generator_state (seed, start_date, through_date, state) VALUES (%s, %s, %s, %s)",
                    (sim.seed, sim.start, sim.start + timedelta(days=sim.day - 1), sim.dumps()),
                )
                cur.execute((SQL_DIR / "warehouse" / "indexes.sql").read_text())
                _save_truth(cur, settings, sim)
            conn.commit()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ANALYZE")
        finally:
            conn.close()


def seed(
    settings: Settings,
    customers: int,
    start: date,
    days: int,
    seed: int = 7,
    price_rise_day: int = 240,
    launch_day: int = 300,
) -> SeedResult:
    """Create the warehouse from scratch: ``customers`` initial customers, ``days`` days from ``start``.

    Facts are dated ``start`` .. ``start + days - 1``. Existing warehouse tables are dropped.
    """
    if customers < 100 or days < 1:
        raise ConfigError(
            f"seed needs --customers >= 100 and --days >= 1 (found {customers}, {days})"
        )
    began = time.monotonic()
    with progress.stage("create_tables"):
        conn = _schema_conn(settings)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"DROP SCHEMA IF EXISTS {db.quote_ident(truth_schema(settings))} CASCADE"
                )
                cur.execute((SQL_DIR / "warehouse" / "schema.sql").read_text())
                plans = [
                    (i + 1, str(PLAN_NAMES[i]), float(PLAN_FEES[i]), int(PLAN_DATA_GB[i]))
                    for i in range(len(PLAN_NAMES))
                ]
                cur.executemany("INSERT INTO plans VALUES (%s, %s, %s, %s)", plans)
            conn.commit()
        finally:
            conn.close()
    sim = _Sim(seed, start, customers, price_rise_day, launch_day)
    rows = _run(settings, sim, days - 1, initial=True)
    _save_state(settings, sim)
    result = SeedResult(
        sim.n, start, start + timedelta(days=days - 1), rows, time.monotonic() - began
    )
    log.info("seeded warehouse: %s", result)
    return result


def advance(settings: Settings, to: date) -> SeedResult:
    """Append simulated days so that the warehouse holds facts through ``to`` (inclusive)."""
    began = time.monotonic()
    conn = _schema_conn(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state FROM generator_state")
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        raise DataError(
            "the warehouse has no generator state: run `nightscore warehouse seed` first"
        )
    sim = _Sim.loads(bytes(row[0]))
    through_day = (to - sim.start).days
    current = sim.start + timedelta(days=sim.day - 1)
    if through_day < sim.day:
        raise ConfigError(
            f"warehouse already holds facts through {current}; --to must be after it (found {to})"
        )
    sim.sends = sent_emails(settings, current + timedelta(days=1), to, sim.start)
    rows = _run(settings, sim, through_day, initial=False)
    _save_state(settings, sim)
    return SeedResult(sim.n, sim.start, to, rows, time.monotonic() - began)


def sent_emails(settings: Settings, first: date, last: date, start: date) -> dict[int, np.ndarray]:
    """Who was sent an email dated ``first`` .. ``last``: {simulated day: customer ids}.

    Every campaign's send log in the serving database counts (``campaigns.*_send_log``,
    rows marked sent); a send dated before ``first`` came after its day was simulated and
    changes nothing.
    """
    tables = db.read_arrow(
        settings.database_url,
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'campaigns' "
        "AND table_name LIKE '%\\_send\\_log' AND column_name = 'customer_id' ORDER BY 1",
    ).column("table_name")
    if not len(tables):
        return {}
    found = db.read_arrow(
        settings.database_url,
        " UNION ".join(
            f"SELECT customer_id, score_date FROM {db.quote_ident('campaigns', t)} "
            "WHERE status = 'sent' AND score_date BETWEEN :first AND :last"
            for t in tables.to_pylist()
        ),
        {"first": first, "last": last},
    )
    customers = found.column("customer_id").to_numpy().astype(np.int64)
    days = found.column("score_date").cast(pa.int32()).to_numpy() - (start - EPOCH).days
    return {int(d): np.unique(customers[days == d]) for d in np.unique(days)}


def truth_schema(settings: Settings) -> str:
    """The schema holding the simulator's truth about emails (no pipeline role reads it)."""
    return f"{_checked_schema(settings.warehouse_schema)}_truth"


def _save_truth(cur: Any, settings: Settings, sim: _Sim) -> None:
    """Write each send's effect and counterfactual, and each send day's would-be effects.

    ``exposures``: one row per email sent (customer, day, log-odds effect, the day they
    would have cancelled without it, if within ``TRUTH_DAYS``). ``effects``: for each
    active customer on each day with sends, the effect an email that day would have had
    and the expected cancellations it would prevent in ``EMAIL_DAYS`` days at that day's
    hazard (``saved``), so that any targeting policy can be scored on the same night.
    """
    schema = db.quote_ident(truth_schema(settings))
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    cur.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.exposures (customer_id integer NOT NULL, "
        "contact_date date NOT NULL, effect real NOT NULL, counterfactual_cancel_date date, "
        "PRIMARY KEY (contact_date, customer_id))"
    )
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.effects (as_of date NOT NULL, "
        "customer_id integer NOT NULL, effect real NOT NULL, saved real NOT NULL, "
        "PRIMARY KEY (as_of, customer_id))"
    )
    x = sim.x
    cur.execute(f"TRUNCATE {schema}.exposures")
    _copy(
        cur,
        f"{schema}.exposures",
        pa.table(
            {
                "customer_id": pa.array(sim.a["customer_id"][x["cust"]]),
                "contact_date": _sim_dates(sim, x["day"]),
                "effect": pa.array(x["effect"]),
                "counterfactual_cancel_date": _sim_dates(sim, x["cf_day"], x["cf_day"] == NEVER),
            }
        ),
    )
    for part in sim.effects:
        cur.execute(
            f"DELETE FROM {schema}.effects WHERE as_of = %s",
            (sim.start + timedelta(days=int(part["day"][0])),),
        )
        _copy(
            cur,
            f"{schema}.effects",
            pa.table(
                {
                    "as_of": _sim_dates(sim, part["day"]),
                    "customer_id": pa.array(sim.a["customer_id"][part["cust"]]),
                    "effect": pa.array(part["effect"]),
                    "saved": pa.array(part["saved"]),
                }
            ),
        )
    sim.effects = []


def _sim_dates(sim: _Sim, days: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """Simulated day numbers as dates (NULL where ``null``)."""
    epoch_days = (days.astype(np.int64) + (sim.start - EPOCH).days).astype(np.int32)
    return pa.array(epoch_days, mask=null).cast(pa.date32())


def _copy(cur: Any, table: str, rows: pa.Table) -> None:
    """COPY an Arrow table's rows (columns in the table's order) into ``table``."""
    import pyarrow.csv as pacsv

    if not rows.num_rows:
        return
    buf = io.BytesIO()
    pacsv.write_csv(rows, buf, pacsv.WriteOptions(include_header=False))
    buf.seek(0)
    cur.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buf)


def data_through(settings: Settings) -> date | None:
    """The last day the synthetic warehouse holds facts for (None if not seeded)."""
    try:
        value = db.scalar(
            settings.warehouse_url,
            "SELECT through_date FROM "
            f"{db.quote_ident(_checked_schema(settings.warehouse_schema), 'generator_state')}",
        )
    except Exception:
        return None
    return db.to_date(value) if value is not None else None
