"""Generated windows (a use case's ``windows``): their SQL from the facts, the facts that move
them from one day to the next, and the roll that adds and takes those away outside the
warehouse. :mod:`pipeline.stages.windows` keeps and trusts them."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.conf.sections import Window
from pipeline.store import db

ROWS = "nightscore_rows"  # rows of the longest window: an entity without any leaves


def _q(name: str) -> str:
    return db.quote_ident(name)


def _day(offset: int) -> str:
    return f"CAST(:as_of AS date) - {offset}"


def facts_sql(w: Window, key: str) -> str:
    """The windows as of ``:as_of`` from the facts: every row of the longest window."""
    d = _q(w.date)
    cols = []
    for agg_name, a in w.aggregates.items():
        within = f"FILTER (WHERE {d} >= {_day(a.days)})"
        if a.kind == "sum":
            expr = f"CAST(coalesce(sum({_q(a.sum or '')}) {within}, 0) AS bigint)"
        elif a.kind == "count":
            expr = f"count(*) {within}"
        else:
            expr = f"max({d}) {within}"
        cols.append(f"{expr} AS {_q(agg_name)}")
    return (
        f"SELECT {_q(key)}, {', '.join(cols)}, count(*) AS {ROWS}\n"
        f"FROM {_q(w.table)}\n"
        f"WHERE {d} >= {_day(w.days)} AND {d} < :as_of\n"
        f"GROUP BY {_q(key)}"
    )


def moved_sql(w: Window, key: str) -> str:
    """The facts that move the windows as of ``:as_of``: those of the day before it (they
    enter every window) and of the day each window of ``n`` days leaves behind (``:as_of``
    minus ``n + 1``). Their key, day and summed columns, in that order, ungrouped:
    :func:`roll` counts and sums them per entity."""
    d = _q(w.date)
    leaving = sorted({a.days for a in w.aggregates.values()} | {w.days})
    days = ", ".join([_day(1)] + [_day(n + 1) for n in leaving])
    columns = ", ".join(_q(c) for c in [key, w.date, *_summed(w)])
    return f"SELECT {columns}\nFROM {_q(w.table)}\nWHERE {d} IN ({days})"


def _summed(w: Window) -> list[str]:
    return sorted({a.sum for a in w.aggregates.values() if a.sum})


EPOCH = date(1970, 1, 1)  # a date32 counts days from it
_NO_DAY = np.iinfo(np.int32).min


def roll(w: Window, key: str, state: pa.Table, moved: pa.Table, day: date) -> pa.Table:
    """The windows as of ``day`` from ``state`` (as of the day before) and ``moved``
    (:func:`moved_sql` as of ``day``), in key order: each sum and count plus what entered
    minus what left its window; the newest day, the day before ``day`` if the entity has a
    fact then, else the kept one while it is inside its window; an entity whose rows all
    left the longest window leaves. Sums are added as integers: they stay exact."""
    was, now = _keys(state.column(key)), _keys(moved.column(0))
    keys = np.concatenate([was, now])
    keys.sort(kind="stable")  # two runs each in key order: merged in one pass
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    at_was, at_now = np.searchsorted(keys, was), np.searchsorted(keys, now)
    on = moved.column(1).cast(pa.int32()).to_numpy()
    summed = {
        c: pc.fill_null(moved.column(2 + j), 0).cast(pa.int64()).to_numpy()
        for j, c in enumerate(_summed(w))
    }

    def kept(name: str, absent: int = 0) -> np.ndarray:
        out = np.full(len(keys), absent, np.int64)
        column = state.column(name)
        if pa.types.is_date(column.type):
            column = column.cast(pa.int32())
        out[at_was] = pc.fill_null(column, absent).to_numpy()
        return out

    days: dict[int, np.ndarray] = {}  # per day back, its rows' positions in ``moved``

    def facts(back: int, column: str | None = None) -> np.ndarray:
        """Per key, the rows (or the sum of ``column``) of the day ``back`` days before."""
        if back not in days:
            days[back] = np.flatnonzero(on == (day - timedelta(days=back) - EPOCH).days)
        rows = days[back]
        out = np.zeros(len(keys), np.int64)
        np.add.at(out, at_now[rows], 1 if column is None else summed[column][rows])
        return out

    entered = facts(1)
    columns: dict[str, Any] = {}
    for name, a in w.aggregates.items():
        if a.kind == "sum":
            columns[name] = kept(name) + facts(1, a.sum) - facts(a.days + 1, a.sum)
        elif a.kind == "count":
            columns[name] = kept(name) + entered - facts(a.days + 1)
        else:
            newest = kept(name, _NO_DAY)
            newest[entered > 0] = (day - timedelta(days=1) - EPOCH).days
            inside = newest >= (day - timedelta(days=a.days) - EPOCH).days
            columns[name] = (newest.astype(np.int32), ~inside)
    columns[ROWS] = kept(ROWS) + entered - facts(w.days + 1)
    stays = columns[ROWS] > 0
    arrays = {key: pa.array(keys[stays], state.schema.field(key).type)}
    for name, values in columns.items():
        target = state.schema.field(name).type
        if isinstance(values, tuple):  # days, and where there is none
            days, none = values
            arrays[name] = pa.array(days[stays], pa.int32(), mask=none[stays]).cast(target)
        else:
            arrays[name] = pa.array(values[stays]).cast(target)
    return pa.table([arrays[n] for n in state.column_names], names=state.column_names)


def _keys(column: pa.ChunkedArray) -> np.ndarray:
    """A block's entity keys as numpy (text as objects); the key checks refuse null keys."""
    return (
        column.to_numpy()
        if pa.types.is_integer(column.type)
        else np.asarray(column.to_pylist(), dtype=object)
    )
