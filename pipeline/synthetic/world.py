"""The synthetic telco's world: its catalogue, a world's parameters and the simulator's state.

The catalogue is what customers choose from (countries, channels, contracts, plans and
their fees, ticket categories, reasons to leave). A ``World`` is what one simulated
history is made of: its initial customers, first day, seed and drift days. ``Sim`` holds
everything the simulation knows on the morning of its next day, one numpy array per
customer attribute plus the unpaid invoices and the emails sent, and saves it as bytes
so that a warehouse can be advanced later exactly where its seeding stopped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, ClassVar

import numpy as np

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

_ID_KINDS = ("customer", "invoice", "ticket", "subscription")


@dataclass(frozen=True)
class World:
    """The parameters of one simulated history.

    Attributes:
        customers: customers who signed up before ``start``.
        start: the first simulated day (it sets the seasons).
        seed: the seed of every random draw.
        price_rise_day: the day (counted from ``start``) German fees rise.
        launch_day: the day the network launches in Poland and a rival's offer starts.
    """

    customers: int
    start: date
    seed: int = 7
    price_rise_day: int = 240
    launch_day: int = 300


class Sim:
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
        "effect": np.float32,  # its log-odds shift (see simulation.email_effect)
        "cf_day": np.int32,  # when they would have left without it (NEVER: not by TRUTH_DAYS)
    }

    def __init__(self, world: World):
        self.world = world
        self.day = 0  # next day to simulate
        self.n = 0
        self.next_ids = dict.fromkeys(_ID_KINDS, 1)
        self.a = {k: np.zeros(0, dtype=t) for k, t in self.ARRAYS.items()}
        self.p = {k: np.zeros(0, dtype=t) for k, t in self.PENDING.items()}
        self.x = {k: np.zeros(0, dtype=t) for k, t in self.EXPOSURES.items()}
        self.sends: dict[int, np.ndarray] = {}  # day -> customer ids sent an email that day
        self.effects: list[dict[str, np.ndarray]] = []  # per day with sends, not persisted

    # -- persistence -------------------------------------------------------------------
    def dumps(self) -> bytes:
        """The state as bytes (an ``.npz`` archive), for ``loads``."""
        w = self.world
        buf = io.BytesIO()
        meta = np.array(
            [w.seed, w.customers, w.price_rise_day, w.launch_day, self.day, self.n]
            + [self.next_ids[k] for k in _ID_KINDS],
            dtype=np.int64,
        )
        arrays: dict[str, Any] = {f"a_{k}": v[: self.n] for k, v in self.a.items()}
        arrays |= {f"p_{k}": v for k, v in self.p.items()}
        arrays |= {f"x_{k}": v for k, v in self.x.items()}
        arrays |= {"meta": meta, "start": np.array([(w.start - EPOCH).days])}
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def loads(cls, blob: bytes) -> Sim:
        """The state ``dumps`` saved (without the day's sends and would-be effects)."""
        z = np.load(io.BytesIO(blob))
        m = [int(x) for x in z["meta"]]
        start = EPOCH + timedelta(days=int(z["start"][0]))
        sim = cls(World(m[1], start, seed=m[0], price_rise_day=m[2], launch_day=m[3]))
        sim.day, sim.n = m[4], m[5]
        sim.next_ids = dict(zip(_ID_KINDS, m[6:], strict=True))
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
        """Append ``count`` customers who sign up on ``signup_days``.

        Args:
            rng: the generator their attributes are drawn from, in a fixed order.
            count: how many.
            signup_days: each one's sign-up day (counted from the world's start).
            country: each one's country code; drawn by ``COUNTRY_WEIGHTS`` when None.

        Returns:
            Their indices into the state's arrays.
        """
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
        """The next ``count`` surrogate ids of ``kind`` (``invoice``, ``ticket``, ...)."""
        first = self.next_ids[kind]
        self.next_ids[kind] += count
        return np.arange(first, first + count, dtype=np.int64)
