"""Publish throughput: nightscore's publish vs a raw binary COPY (ceiling), the same COPY
followed by the primary key a served table needs for lookups by key (``raw_copy+key``),
and pandas to_sql.

    .venv/bin/python benchmarks/publish.py [--rows 1000000 5000000] [--to-sql-rows 50000]

What each variant times:

- ``raw_copy``: one binary COPY (``db.ingest``, ADBC) of the night's rows, already in
  memory, into an empty table shaped like the served table (``LIKE`` it: the same six
  columns and NOT NULLs, no key, no CHECKs).
- ``raw_copy+key``: the same, then the same primary key publish builds, in a session with
  publish's key-build settings (``publish.KEY_BUILD_SETTINGS``, e.g. maintenance_work_mem;
  everything else is the server's default for both).
- ``nightscore``: ``publish_scores`` from the Parquet parts: reading them, the deciles,
  the staging table with its CHECKs and key, the validation and the swap.

Both ratios (vs COPY, vs COPY+key) are printed per population. Each variant runs in its
own process (so its peak RSS is its own) against a fresh database on
NIGHTSCORE_DATABASE_URL's server, or the embedded server; the variants take turns, round
after round (``--repeat``), and the median of the rounds is reported, so load from other
processes falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_DATE = date(2025, 6, 1)


def make_parts(rows: int, folder: Path, partitions: int = 2) -> list[Path]:
    """Scored parts as the pipeline writes them: hash partitions, each in key order."""
    from pipeline.stages.score import partition_of

    rng = np.random.default_rng(0)
    keys = np.arange(1, rows + 1, dtype=np.int64)
    probs = rng.beta(1.2, 20.0, rows)
    which = partition_of(keys, partitions)
    paths = []
    for p in range(partitions):
        mine = which == p
        path = folder / f"part-{p}.parquet"
        table = pa.table({"customer_id": keys[mine], "churn_probability": probs[mine]})
        pq.write_table(table, path, row_group_size=50_000)  # as score_partition writes them
        paths.append(path)
    return paths


def reset_peak_rss() -> None:
    """Linux keeps a process's peak RSS across fork/exec: start this child's count afresh."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def variant(name: str, url: str, parts: list[Path], rows: int) -> dict:
    from pipeline.conf import usecase
    from pipeline.conf.config import Settings
    from pipeline.stages import publish
    from pipeline.stages.score import ScoredPart
    from pipeline.store import db, ledger

    uc = usecase.load("churn")
    began = time.monotonic()
    if name == "nightscore":
        settings = Settings(database_url=url, warehouse_url=url, home=Path(tempfile.mkdtemp()))
        run = ledger.RunContext("churn", SCORE_DATE, f"bench-{secrets.token_hex(3)}")
        ledger.start(settings, run)
        scored = [
            ScoredPart(i, p, pq.ParquetFile(p).metadata.num_rows) for i, p in enumerate(parts)
        ]
        began = time.monotonic()
        publish.publish_scores(settings, uc, run, "bench-model", scored, rows)
    elif name in ("raw_copy", "raw_copy+key"):
        conn = db.connect(url)
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE bench_raw (LIKE {publish.SCHEMA}.{uc.score_table} INCLUDING DEFAULTS)"
            )
        conn.commit()
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        n = table.num_rows
        full = pa.table(
            {
                "score_date": pa.array(
                    np.full(n, (SCORE_DATE - date(1970, 1, 1)).days, dtype=np.int32)
                ).cast(pa.date32()),
                "customer_id": table.column("customer_id"),
                "model_version": pa.array(
                    np.full(n, "bench-model", dtype=object), type=pa.string()
                ),
                "churn_probability": table.column("churn_probability"),
                "risk_decile": pa.array(np.ones(n, dtype=np.int16)),
                "control_group": pa.array(np.zeros(n, dtype=bool)),
            }
        )
        began = time.monotonic()
        db.ingest(url, "bench_raw", full, "public")
        if name == "raw_copy+key":  # as publish builds it: after the COPY, same settings
            with conn.cursor() as cur:
                for setting, value in publish.KEY_BUILD_SETTINGS:
                    cur.execute("SELECT set_config(%s, %s, true)", (setting, value))
                cur.execute("ALTER TABLE bench_raw ADD PRIMARY KEY (score_date, customer_id)")
            conn.commit()
        conn.close()
    elif name == "to_sql":
        import pandas as pd
        import sqlalchemy as sa

        from pipeline.conf.urls import sqlalchemy_url

        frame = pq.read_table(parts[0]).slice(0, rows).to_pandas()
        frame.insert(0, "score_date", SCORE_DATE)
        frame["model_version"] = "bench-model"
        frame["risk_decile"] = 1
        engine = sa.create_engine(sqlalchemy_url(url))
        began = time.monotonic()
        frame.to_sql("bench_to_sql", engine, if_exists="replace", index=False, chunksize=10_000)
        engine.dispose()
        pd.DataFrame()  # keep the import used for the reader
    seconds = time.monotonic() - began
    return {
        "variant": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds),
        "peak_rss_mb": round(peak_rss_kb() / 1024),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--to-sql-rows", type=int, default=50_000)
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds of all variants; the median is reported"
    )
    ap.add_argument(
        "--child", nargs=4, metavar=("VARIANT", "URL", "FOLDER", "ROWS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        name, url, folder, rows = args.child
        reset_peak_rss()
        parts = sorted(Path(folder).glob("part-*.parquet"))
        print(json.dumps(variant(name, url, parts, int(rows))))
        return 0

    from _common import fresh_database

    from pipeline.store import db

    results = []
    for rows in args.rows:
        with fresh_database() as url, tempfile.TemporaryDirectory() as folder:
            make_parts(rows, Path(folder))
            variants = (
                ("raw_copy", rows),
                ("raw_copy+key", rows),
                ("nightscore", rows),
                ("to_sql", min(rows, args.to_sql_rows)),
            )
            runs: dict[str, list[dict]] = {v: [] for v, _ in variants}
            for _ in range(args.repeat):
                for v, n in variants:
                    # each timed run starts from a clean slate: no checkpoint debt from the last
                    db.scalar(
                        url, "DROP TABLE IF EXISTS bench_raw, bench_to_sql; CHECKPOINT; SELECT 1"
                    )
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", v, url, folder, str(n)],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=os.environ,
                    )
                    runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for v, n in variants:
                seconds = statistics.median(r["seconds"] for r in runs[v])
                median = {
                    "variant": v,
                    "rows": n,
                    "seconds": round(seconds, 3),
                    "rows_per_second": round(n / seconds),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[v]),
                    "runs_seconds": [r["seconds"] for r in runs[v]],
                }
                results.append({"population": rows} | median)
                print(json.dumps(results[-1]), flush=True)
    print()
    print(
        f"{'population':>10} {'variant':>12} {'rows':>9} {'rows/s':>10} {'vs COPY':>8} "
        f"{'vs COPY+key':>12} {'peak RSS MB':>12}"
    )
    for pop in args.rows:
        mine = [r for r in results if r["population"] == pop]
        ceiling = {r["variant"]: r["rows_per_second"] for r in mine}
        for r in mine:
            print(
                f"{pop:>10,} {r['variant']:>12} {r['rows']:>9,} {r['rows_per_second']:>10,} "
                f"{r['rows_per_second'] / ceiling['raw_copy']:>8.2f} "
                f"{r['rows_per_second'] / ceiling['raw_copy+key']:>12.2f} {r['peak_rss_mb']:>12,}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
