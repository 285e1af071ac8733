"""Rolling windows kept as state vs recomputed from the facts: the case for item 3's design.

    .venv/bin/python benchmarks/incremental_state.py --customers 1000000 [--keep]

On the churn warehouse of N customers (seeded, or reused from an earlier ``--keep`` run of
this or ``benchmarks/nightly.py``), the usage windows of the churn features (minutes over
7, 30 and 60 days, data and active days over 30, last usage day) as of day D, two ways:

- full: every usage fact of the 60 days before D aggregated per customer, as the feature
  query does tonight (O(population x window));
- incremental: the state as of D-1 plus the day entering the windows, minus the days
  leaving them (O(population): four days of facts and one state row per customer).

The state as of D-1 is built from the facts first (untimed); the two results are compared
row for row. Nothing here is used by a night yet: the pipeline recomputes the windows.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import timedelta
from typing import Any

WINDOWS = """
    sum(minutes) FILTER (WHERE usage_date >= %(day)s::date - 7)  AS m7,
    sum(minutes) FILTER (WHERE usage_date >= %(day)s::date - 30) AS m30,
    sum(minutes)                                                 AS m60,
    sum(data_mb) FILTER (WHERE usage_date >= %(day)s::date - 30) AS d30,
    count(*) FILTER (WHERE usage_date >= %(day)s::date - 30)     AS a30,
    max(usage_date)                                              AS last_date
"""


def full(schema: str, target: str) -> str:
    """The windows as of %(day)s from 60 days of facts."""
    return f"""
        CREATE TABLE {schema}.{target} AS
        SELECT customer_id, {WINDOWS}
        FROM usage_daily
        WHERE usage_date >= %(day)s::date - 60 AND usage_date < %(day)s::date
        GROUP BY customer_id
    """


def incremental(schema: str, previous: str, target: str) -> str:
    """The windows as of %(day)s from the state as of the day before and four days of facts:
    the day entering every window and the days leaving the 7, 30 and 60-day windows."""
    return f"""
        CREATE TABLE {schema}.{target} AS
        WITH k AS (
            SELECT customer_id,
                   sum(minutes) FILTER (WHERE usage_date = %(day)s::date - 1)  AS m_in,
                   sum(data_mb) FILTER (WHERE usage_date = %(day)s::date - 1)  AS d_in,
                   count(*) FILTER (WHERE usage_date = %(day)s::date - 1)      AS a_in,
                   sum(minutes) FILTER (WHERE usage_date = %(day)s::date - 8)  AS m_out7,
                   sum(minutes) FILTER (WHERE usage_date = %(day)s::date - 31) AS m_out30,
                   sum(data_mb) FILTER (WHERE usage_date = %(day)s::date - 31) AS d_out30,
                   count(*) FILTER (WHERE usage_date = %(day)s::date - 31)     AS a_out30,
                   sum(minutes) FILTER (WHERE usage_date = %(day)s::date - 61) AS m_out60
            FROM usage_daily
            WHERE usage_date IN (%(day)s::date - 1, %(day)s::date - 8, %(day)s::date - 31,
                                 %(day)s::date - 61)
            GROUP BY customer_id
        )
        SELECT coalesce(s.customer_id, k.customer_id) AS customer_id,
               coalesce(s.m7, 0) + coalesce(k.m_in, 0) - coalesce(k.m_out7, 0) AS m7,
               coalesce(s.m30, 0) + coalesce(k.m_in, 0) - coalesce(k.m_out30, 0) AS m30,
               coalesce(s.m60, 0) + coalesce(k.m_in, 0) - coalesce(k.m_out60, 0) AS m60,
               coalesce(s.d30, 0) + coalesce(k.d_in, 0) - coalesce(k.d_out30, 0) AS d30,
               coalesce(s.a30, 0) + coalesce(k.a_in, 0) - coalesce(k.a_out30, 0) AS a30,
               CASE WHEN k.a_in > 0 THEN %(day)s::date - 1 ELSE s.last_date END AS last_date
        FROM {schema}.{previous} s FULL JOIN k USING (customer_id)
    """


def differing(schema: str, a: str, b: str) -> str:
    """Rows of the full windows and the incremental state (customers still inside the
    60 days) that differ; a window with no fact is NULL in one and 0 in the other."""
    return f"""
        SELECT count(*) FROM {schema}.{a} f
        FULL JOIN (SELECT * FROM {schema}.{b} WHERE last_date >= %(day)s::date - 60) i
        USING (customer_id)
        WHERE (coalesce(f.m7, 0), coalesce(f.m30, 0), f.m60, coalesce(f.d30, 0), f.a30,
               f.last_date)
              IS DISTINCT FROM (i.m7, i.m30, i.m60, i.d30, i.a30, i.last_date)
    """


def timed(cur: Any, query: str, params: dict[str, Any]) -> float:
    began = time.monotonic()
    cur.execute(query, params)
    return time.monotonic() - began


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=230, help="days of history before the night")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the warehouse for the next run")
    args = ap.parse_args()

    from _common import FIRST_DAY, warehouse_database

    from pipeline import db

    day = FIRST_DAY + timedelta(days=args.days + 2)  # benchmarks/nightly.py's third night
    with warehouse_database(args.customers, args.days + 2, args.seed, args.keep) as wh:
        schema = f"state_bench_{secrets.token_hex(3)}"
        conn = db.connect(wh, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE SCHEMA {schema}; SET search_path = warehouse")
                cur.execute(full(schema, "before"), {"day": day - timedelta(days=1)})
                full_s = timed(cur, full(schema, "full"), {"day": day})
                inc_s = timed(cur, incremental(schema, "before", "incremental"), {"day": day})
                cur.execute(differing(schema, "full", "incremental"), {"day": day})
                bad = cur.fetchone()[0]
                cur.execute(f"SELECT count(*) FROM {schema}.full")
                rows = cur.fetchone()[0]
                cur.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            conn.close()
    print(f"usage windows as of {day} for {rows:,} customers:")
    print(f"  full (60 days of facts)            {full_s:7.2f} s")
    print(f"  incremental (state + 4 days)       {inc_s:7.2f} s   {full_s / inc_s:.1f}x")
    print(f"  rows that differ                   {bad:7,}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
