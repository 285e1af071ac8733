"""The source checks at scale: seconds per query of ``sources.observe`` and in all.

    .venv/bin/python benchmarks/sources.py --customers 300000 [--days 230] [--keep]

On the churn warehouse of N customers (seeded, or reused from an earlier ``--keep`` run of
this or the other warehouse benchmarks), tonight's source checks (as of the day after the
last day of data, with the lookback the nightly stage passes) run each query of
``observe`` alone, best of ``--repeat``, then ``observe`` whole (two connections, as the
stage runs it). The grouped scan of the usage table is split into what each part of it
costs: rows per day only, and with the content fingerprint ``history_unchanged`` compares
night to night (a day restated in place shows only in its content). These are the costs
of a night that reads every day; last, ``observe`` the night after one that kept its
scans, which reads only the day since (``pipeline.stages.source_scans``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import timedelta
from typing import Any


def best(repeat: int, run: Any) -> float:
    times = []
    for _ in range(repeat):
        began = time.monotonic()
        run()
        times.append(time.monotonic() - began)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=230, help="days of history before the night")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the warehouse for the next run")
    args = ap.parse_args()

    from _common import FIRST_DAY, warehouse_database
    from psycopg2 import sql

    from pipeline.conf import contract, usecase
    from pipeline.conf.contract import _DAY_KINDS
    from pipeline.stages import source_queries, sources
    from pipeline.stages.table_checks import Scope, TableChecks
    from pipeline.store import db

    logging.basicConfig(level=logging.WARNING)
    uc = usecase.load("churn")
    spec = contract.load_contract(uc.contract)
    kept = {w.table: w.days for w in uc.windows.values()}
    lookback = {t: spec.lookback(t, kept) for t in spec.tables}
    day = FIRST_DAY + timedelta(days=args.days + 2)  # benchmarks/nightly.py's third night
    with warehouse_database(args.customers, args.days + 2, args.seed, args.keep) as wh:
        conn = db.connect(wh)
        try:
            with conn.cursor() as cur:
                found = source_queries.catalog(conn, cur, "warehouse", list(spec.tables))
                scope = Scope("warehouse", spec, day, day, "UTC", uc.entity_key)
                rows = []
                for name, table_spec in spec.tables.items():
                    if table_spec.date_column is None:
                        continue
                    columns = found[name]
                    table = TableChecks(
                        scope,
                        name,
                        table_spec,
                        source_queries.Axis(
                            table_spec.date_column, _DAY_KINDS[columns[table_spec.date_column]]
                        ),
                        tuple(
                            c for c in table_spec.columns if columns[c] in source_queries.FLOATING
                        ),
                        tuple(c for c, d in table_spec.columns.items() if d.referenced),
                        lookback.get(name, 0),
                    )
                    queries = [
                        (keys[0].split(":")[0], query) for keys, query, _ in table.fast_queries()
                    ]
                    if name == "usage_daily":
                        queries += _usage_parts(table, sql)
                    for what, query in queries:

                        def run(q: Any = query, p: Any = table.params) -> None:
                            cur.execute(q, p)
                            cur.fetchall()

                        rows.append((f"{name}: {_LABELS.get(what, what)}", best(args.repeat, run)))
            conn.rollback()
        finally:
            conn.close()

        def observe() -> None:
            sources.observe(wh, "warehouse", spec, day, "UTC", uc.entity_key, history_days=lookback)

        whole = best(args.repeat, observe)
        earlier = sources.observe(
            wh,
            "warehouse",
            spec,
            day - timedelta(days=1),
            "UTC",
            uc.entity_key,
            history_days=lookback,
        )

        def observe_after() -> None:
            seen = sources.observe(
                wh,
                "warehouse",
                spec,
                day,
                "UTC",
                uc.entity_key,
                history_days=lookback,
                kept=earlier.kept,
                counts=earlier.counts,
            )
            assert all(k.read_from == day - timedelta(days=1) for k in seen.kept.values())

        after = best(args.repeat, observe_after)

    print(f"source checks of the churn warehouse as of {day}, {args.customers:,} customers")
    print(f"  {'query (best of ' + str(args.repeat) + ')':66s} seconds")
    for label, seconds in rows:
        print(f"  {label:66s} {seconds:7.2f}")
    print(f"  {'observe, two connections (what the stage runs), every day read':66s} {whole:7.2f}")
    print(
        f"  {'observe the night after one that kept its scans (the new day read)':66s} {after:7.2f}"
    )
    return 0


_LABELS = {
    "future": "grouped scan of the scanned days (every dated check)",
    "unique": "unique keys over the whole table",
    "ref": "orphans of the new day (references)",
}


def _usage_parts(table: Any, sql: Any) -> list[tuple[str, Any]]:
    """The usage table's grouped scan reduced to rows per day, then with the fingerprint."""
    from pipeline.store import db

    day = sql.Identifier(table.axis.column)
    where = sql.SQL("{} >= CAST(%(scan_start)s AS date)").format(day)
    counts = sql.SQL("SELECT {d}, count(*) FROM {t} WHERE {w} GROUP BY 1").format(
        d=day, t=table.relation, w=where
    )
    grouped = sql.SQL("SELECT {d}, count(*), {f} FROM {t} WHERE {w} GROUP BY 1")
    content = grouped.format(d=day, t=table.relation, w=where, f=table.content)
    as_text = db.fingerprint(list(table.spec.columns), table.column_types, record_hash=False)
    earlier = grouped.format(d=day, t=table.relation, w=where, f=as_text)
    return [
        ("  of which: rows per day only", counts),
        ("  of which: rows and content fingerprint per day (each row as a record)", content),
        ("  of which: the same, each row's text hashed (the earlier fingerprint)", earlier),
    ]


if __name__ == "__main__":
    sys.exit(main())
