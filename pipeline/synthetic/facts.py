"""The simulation's facts as the warehouse's Arrow tables.

A day's simulation appends its rows to ``Buffers`` as numpy columns of codes and day
numbers; ``Buffers.drain`` turns what has accumulated into one Arrow table per warehouse
table, typed as the warehouse's columns: day numbers as dates, fees as money rounded to
the cent, codes as the catalogue's labels, customer ids as e-mail addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.synthetic.world import (
    CANCEL_REASONS,
    CHANNELS,
    CONTRACTS,
    COUNTRIES,
    FIRST_NAMES,
    TICKET_CATEGORIES,
)


class Buffers:
    """Rows produced by the simulation, flushed to the warehouse as Arrow tables."""

    def __init__(self) -> None:
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {}

    def add(self, table: str, **cols: np.ndarray) -> None:
        """Append rows to ``table``, one numpy array per column (nothing if they are empty)."""
        if len(next(iter(cols.values()))):
            self.parts.setdefault(table, []).append(cols)

    def drain(self) -> dict[str, pa.Table]:
        """Every table's rows appended since the last drain, as Arrow; empties the buffers."""
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


def _to_arrow(table: str, cols: dict[str, np.ndarray]) -> pa.Table:
    spec = _SCHEMAS[table]
    return pa.table({name: conv(cols[name]) for name, conv in spec.items()})
