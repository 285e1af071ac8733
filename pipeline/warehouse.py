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

from pipeline import db, progress
from pipeline.config import SQL_DIR, Settings
from pipeline.errors import ConfigError, DataError

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


def _simulate_day(sim: _Sim, out: _Buffers) -> None:
    """Advance the simulation by one day, appending that day's facts to ``out``."""
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
    overdue = np.bincount(p["cust"][p["due_day"] < t], minlength=n)[act]
    tenure = (t - a["signup_day"][act]).astype(np.float64)
    disengaged = np.clip((t - a["disengage_day"][act]) / 45.0, 0.0, 1.0)
    since_rise = (t - a["last_rise_day"][act]).astype(np.float64)
    rise = np.exp(-since_rise / 75.0) * (since_rise >= 0)
    # From the launch day on, a rival's unlimited-data offer lures heavy data users away:
    # a new, lasting reason to leave that a model trained before it has never seen.
    lured = np.clip(np.log(a["base_data"][act]) - 5.9, 0.0, 1.5) * (t >= sim.launch_day)

    # Cancellations first: a customer who leaves today has no usage today.
    contract_eff = np.array([0.9, -0.2, -1.1])[a["contract"][act]]
    logit = (
        -8.1
        + contract_eff
        - 0.22 * np.log1p(tenure / 30.0)
        + 3.3 * disengaged
        + 0.75 * np.minimum(overdue, 3)
        + 0.5 * a["ticket_level"][act]
        + 3.2 * a["price_sens"][act] * rise
        + 0.25 * np.sin(2 * np.pi * (doy - 20) / 365)
        + 0.6 * (a["country"][act] == PL)
        + 1.6 * lured
        + 0.25 * (a["channel"][act] == 2)
    )
    leaves = rng.random(len(act)) < _sigmoid(logit)
    gone = act[leaves]
    if len(gone):
        a["active"][gone] = False
        reason = np.where(
            rise[leaves] > 0.2,
            0,
            np.where(
                (disengaged[leaves] > 0.3) | (lured[leaves] > 0.5), 2, rng.integers(1, 5, len(gone))
            ),
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
    movers = act[rng.random(len(act)) < 0.0007]
    if len(movers):
        a["plan"][movers] = np.clip(a["plan"][movers] + rng.choice([-1, 1], len(movers)), 0, 3)
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
    if len(billed):
        stress = a["stress"][billed]
        late = rng.random(len(billed)) < 0.03 + 0.9 * stress**2
        never = rng.random(len(billed)) < 0.004 + 0.05 * stress
        pay_day = np.where(
            late, t + 14 + rng.geometric(1 / 12, len(billed)), t + rng.integers(1, 14, len(billed))
        )
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
    used = rng.random(len(act)) < 0.95 - 0.6 * disengaged
    u = act[used]
    fade = 1 - 0.75 * disengaged[used]
    minutes = a["base_minutes"][u] * fade * season * rng.lognormal(0, 0.35, len(u))
    data_mb = a["base_data"][u] * fade * season * rng.lognormal(0, 0.5, len(u))
    out.add(
        "usage_daily",
        customer_id=a["customer_id"][u],
        usage_date=np.full(len(u), epoch_day),
        minutes=np.rint(minutes),
        data_mb=np.rint(data_mb),
        sessions=1 + rng.poisson(minutes / 25.0),
    )

    # Support tickets: disengaging, overdue or recently re-priced customers complain more.
    rate = 0.0015 + 0.02 * disengaged + 0.03 * rise * a["price_sens"][act] + 0.004 * (overdue > 0)
    opened = rng.random(len(act)) < rate
    tk = act[opened]
    a["ticket_level"][act] *= np.float32(np.exp(-1 / 20))
    if len(tk):
        a["ticket_level"][tk] += 1
        category = np.where(
            disengaged[opened] > 0.5,
            3,
            np.where(rise[opened] > 0.2, 0, rng.choice(4, len(tk), p=[0.35, 0.35, 0.25, 0.05])),
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
    rows = _run(settings, sim, through_day, initial=False)
    _save_state(settings, sim)
    return SeedResult(sim.n, sim.start, to, rows, time.monotonic() - began)


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
