"""Shared by the benchmarks: a throw-away database on the configured (or embedded) server."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fresh_database(prefix: str = "nightscore_bench") -> Iterator[str]:
    """Create a uniquely named database with the serving schema; drop it afterwards."""
    from pipeline import db, serving, usecase
    from pipeline.config import load_settings, with_database

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
def warehouse_database(
    customers: int, days: int, seed: int, keep: bool
) -> Iterator[tuple[str, bool]]:
    """A database holding the warehouse of ``customers`` x ``days`` (from 2025-01-01): the one
    an earlier ``--keep`` run left, if any, else a new one. Yields (url, reused); dropped
    afterwards unless ``keep``."""
    from pipeline import db
    from pipeline.config import load_settings, with_database

    server = load_settings().init_url
    name = f"nightscore_bench_wh_{customers}_{days}_{seed}"
    admin = with_database(server, "postgres")
    conn = db.connect(admin, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        reused = cur.fetchone() is not None
        if reused:
            url = with_database(server, name)
            try:
                db.scalar(url, "SELECT count(*) FROM warehouse.generator_state")
            except Exception:
                reused = False
                cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if not reused:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    try:
        yield with_database(server, name), reused
    finally:
        if not keep:
            conn = db.connect(admin, autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()
