"""Windows rolled outside the warehouse (``rolling.roll``) equal the windows computed from every
fact of the window, day after day, for integer and text keys, entities entering and leaving."""

from __future__ import annotations

import random
from datetime import date, timedelta

import pyarrow as pa
import pytest

from pipeline.conf.sections import Window
from pipeline.stages import rolling

W = Window.model_validate(
    {
        "table": "usage",
        "date": "day",
        "aggregates": {
            "minutes_3d": {"sum": "minutes", "days": 3},
            "minutes_10d": {"sum": "minutes", "days": 10},
            "bytes_10d": {"sum": "bytes", "days": 10},
            "active_3d": {"count": "*", "days": 3},
            "last_day": {"last": "day", "days": 6},
        },
    }
)
START = date(2026, 1, 1)


def _facts(keys: list, days: int, seed: int) -> list[tuple]:
    """(key, day, minutes, bytes) rows: some entities every day, some now and then, some
    that stop (and leave the windows), a NULL sum, two rows of one entity on one day."""
    rng = random.Random(seed)
    rows = []
    for i, key in enumerate(keys):
        rate = (1.0, 0.3, 0.05)[i % 3]
        stop = days if i % 4 else rng.randrange(days)
        for d in range(stop):
            if rng.random() < rate:
                minutes = None if rng.random() < 0.02 else rng.randrange(-5, 2_000_000_000)
                rows.append((key, START + timedelta(days=d), minutes, rng.randrange(10**12)))
    rows.append((keys[0], START + timedelta(days=5), 7, 7))
    return rows


def _from_facts(rows: list[tuple], as_of: date, key_type: pa.DataType) -> pa.Table:
    """The windows as of ``as_of`` from every fact, in key order (what ``facts_sql`` gives)."""
    out: dict = {}
    for key, day, minutes, size in rows:
        if not as_of - timedelta(days=W.days) <= day < as_of:
            continue
        e = out.setdefault(key, {n: 0 for n in W.aggregates} | {"last_day": None, "rows": 0})
        e["rows"] += 1
        for name, a in W.aggregates.items():
            if day < as_of - timedelta(days=a.days):
                continue
            if a.kind == "sum":
                e[name] += (minutes if a.sum == "minutes" else size) or 0
            elif a.kind == "count":
                e[name] += 1
            elif e[name] is None or day > e[name]:
                e[name] = day
    keys = sorted(out)
    columns = {"key": pa.array(keys, key_type)}
    for name, a in W.aggregates.items():
        kind = pa.date32() if a.kind == "last" else pa.int64()
        columns[name] = pa.array([out[k][name] for k in keys], kind)
    columns[rolling.ROWS] = pa.array([out[k]["rows"] for k in keys], pa.int64())
    return pa.table(columns)


def _moved(rows: list[tuple], as_of: date, key_type: pa.DataType) -> pa.Table:
    """The rows ``moved_sql`` reads as of ``as_of``: key, day, then the summed columns."""
    leaving = {a.days for a in W.aggregates.values()} | {W.days}
    days = {as_of - timedelta(days=1)} | {as_of - timedelta(days=n + 1) for n in leaving}
    picked = [r for r in rows if r[1] in days]
    random.Random(1).shuffle(picked)  # the warehouse gives them in no order
    return pa.table(
        {
            "key": pa.array([r[0] for r in picked], key_type),
            "day": pa.array([r[1] for r in picked], pa.date32()),
            "bytes": pa.array([r[3] for r in picked], pa.int64()),
            "minutes": pa.array([r[2] for r in picked], pa.int32()),
        }
    )


@pytest.mark.parametrize(
    ("key_type", "keys"),
    [
        (pa.int32(), list(range(1000, 1400, 2))),
        (pa.string(), [f"acct-{i:x}" for i in range(200)] + ["Z", "a", "é", ""]),
    ],
)
def test_rolled_windows_equal_the_windows_from_every_fact(key_type, keys) -> None:
    rows = _facts(keys, 40, seed=3)
    state = _from_facts(rows, START + timedelta(days=12), key_type)
    left = 0
    for d in range(13, 40):
        as_of = START + timedelta(days=d)
        rolled = rolling.roll(W, "key", state, _moved(rows, as_of, key_type), as_of)
        expected = _from_facts(rows, as_of, key_type)
        assert rolled.schema == expected.schema
        assert rolled.to_pydict() == expected.to_pydict(), as_of
        left += len(set(state.column("key").to_pylist()) - set(rolled.column("key").to_pylist()))
        state = rolled
    assert left > 0, "no entity left the windows"


def test_the_moved_facts_are_read_as_they_are_in_the_order_roll_takes_them() -> None:
    text = rolling.moved_sql(W, "key")
    assert text.startswith('SELECT "key", "day", "bytes", "minutes"\nFROM "usage"\n')
    assert "GROUP BY" not in text
    for back in (1, 4, 7, 11):  # the day entering, and the day leaving each window
        assert f"CAST(:as_of AS date) - {back}" in text
