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
