"""Shared by the benchmarks: a throw-away database on the configured (or embedded) server."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

FIRST_DAY = date(2025, 1, 1)  # the benchmark warehouses' first day of history


@contextmanager
def fresh_database(prefix: str = "nightscore_bench") -> Iterator[str]:
    """Create a uniquely named database with the serving schema; drop it afterwards."""
    from pipeline.conf import usecase
    from pipeline.conf.config import load_settings
    from pipeline.conf.urls import with_database
    from pipeline.store import db, serving

    server = load_settings().init_url
    name = f"{prefix}_{secrets.token_hex(3)}"
    admin = with_database(server, "postgres")
    conn = db.connect(admin, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    url = with_database(server, name)
    serving.init(url, usecase.load_all())
    try:
        yield url
    finally:
        conn = db.connect(admin, autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextmanager
def warehouse_database(customers: int, days: int, seed: int, keep: bool) -> Iterator[str]:
    """A database holding the warehouse of ``customers`` x ``days`` from ``FIRST_DAY``: the
    one an earlier ``--keep`` run left, if any, else a new one, seeded here. Yields its URL;
    dropped afterwards unless ``keep``."""
    from dataclasses import replace

    from pipeline.conf.config import load_settings
    from pipeline.conf.urls import with_database
    from pipeline.store import db
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    settings = load_settings()
    server = settings.init_url
    name = f"nightscore_bench_wh_{customers}_{days}_{seed}"
    url = with_database(server, name)
    admin = with_database(server, "postgres")
    conn = db.connect(admin, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        reused = cur.fetchone() is not None
        if reused:
            try:
                db.scalar(url, "SELECT count(*) FROM warehouse.generator_state")
            except Exception:
                reused = False
                cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if not reused:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    try:
        if reused:
            print(f"reusing the warehouse of {customers:,} customers x {days} days")
        else:
            began = time.monotonic()
            seeded = warehouse.seed(
                replace(settings, warehouse_url=url), World(customers, FIRST_DAY, seed=seed), days
            )
            print(
                f"seeded {customers:,} customers x {days} days in "
                f"{time.monotonic() - began:.0f} s ({sum(seeded.rows.values()):,} rows)"
            )
        yield url
    finally:
        if not keep:
            conn = db.connect(admin, autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()
