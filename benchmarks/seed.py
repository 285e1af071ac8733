"""Warehouse seeding throughput: the vectorized simulation + COPY vs row-wise INSERT.

    .venv/bin/python benchmarks/seed.py [--customers 200000] [--days 365] [--insert-rows 50000]

Runs in a fresh schema on the configured server (NIGHTSCORE_DATABASE_URL) or the
embedded one, and drops it afterwards. The naive baseline inserts a slice of the same
usage rows with psycopg2 ``executemany`` and is scaled to rows per second.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from dataclasses import replace
from datetime import date


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--insert-rows", type=int, default=50_000)
    args = ap.parse_args()

    from pipeline.conf.config import load_settings
    from pipeline.store import db
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    schema = f"bench_wh_{secrets.token_hex(3)}"
    settings = replace(load_settings(), warehouse_schema=schema)
    try:
        result = warehouse.seed(
            settings, World(args.customers, date(2024, 1, 1), seed=7), args.days
        )
        total = sum(result.rows.values())
        print(
            f"seed {args.customers:,} customers x {args.days} days: {result.seconds:.1f}s, "
            f"{total:,} rows ({result.rows['usage_daily']:,} usage rows), {total / result.seconds:,.0f} rows/s"
        )

        conn = db.connect(settings.warehouse_url)
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT customer_id, usage_date, minutes, data_mb, sessions FROM {schema}.usage_daily "
                "LIMIT %s",
                (args.insert_rows,),
            )
            rows = cur.fetchall()
            cur.execute(f"CREATE TABLE {schema}.usage_naive (LIKE {schema}.usage_daily)")
            began = time.monotonic()
            cur.executemany(f"INSERT INTO {schema}.usage_naive VALUES (%s, %s, %s, %s, %s)", rows)
            conn.commit()
            naive = len(rows) / (time.monotonic() - began)
        conn.close()
        print(
            f"naive row-wise INSERT baseline: {naive:,.0f} rows/s "
            f"(the same {total:,} rows would take ~{total / naive / 60:,.0f} min)"
        )
    finally:
        db.scalar(settings.database_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE; SELECT 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
