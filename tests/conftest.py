"""Shared fixtures: a real PostgreSQL for the session, a uniquely named database, a small warehouse.

The server is ``NIGHTSCORE_TEST_DATABASE_URL`` when set (e.g. the one on 127.0.0.1:5432),
else the embedded PostgreSQL started under a temporary directory. Every session creates
its own databases (``nightscore_test_<id>``) and drops them at the end.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

# Airflow reads its configuration at import: give the tests their own home before any import.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="nightscore-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parent.parent / "dags")
for _var in (
    "NIGHTSCORE_DATABASE_URL",
    "NIGHTSCORE_WAREHOUSE_URL",
    "NIGHTSCORE_WAREHOUSE_SCHEMA",
    "NIGHTSCORE_USECASES",
    "NIGHTSCORE_USE_CASE",
):
    os.environ.pop(_var, None)
# Two cores shared with the demo in CI: oversubscribed OpenMP makes training crawl.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ["NIGHTSCORE_HOME"] = str(_SESSION_HOME / "home")

from pipeline.conf import embedded, usecase  # noqa: E402
from pipeline.conf.config import Settings  # noqa: E402
from pipeline.conf.urls import with_database  # noqa: E402
from pipeline.store import db, serving  # noqa: E402

WAREHOUSE_START = date(2024, 1, 1)
WAREHOUSE_DAYS = 330
WAREHOUSE_CUSTOMERS = 4000
SCORE_DATE = date(2024, 11, 20)  # within the seeded history: features use facts before it


def _server_url() -> str:
    configured = os.environ.get("NIGHTSCORE_TEST_DATABASE_URL")
    if configured:
        return configured
    return embedded.ensure_server(_SESSION_HOME / "embedded", "postgres")


def create_database(server: str, name: str) -> str:
    conn = db.connect(with_database(server, "postgres"), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return with_database(server, name)


def drop_database(server: str, name: str) -> None:
    conn = db.connect(with_database(server, "postgres"), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    yield _server_url()
    if not os.environ.get("NIGHTSCORE_TEST_DATABASE_URL"):
        embedded.stop_server(_SESSION_HOME / "embedded")


@pytest.fixture(scope="session")
def session_id() -> str:
    return f"{os.getpid()}_{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def database_url(server_url: str, session_id: str) -> Iterator[str]:
    name = f"nightscore_test_{session_id}"
    url = create_database(server_url, name)
    serving.init(url, usecase.load_all())
    yield url
    drop_database(server_url, name)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url, warehouse_url=database_url, home=_SESSION_HOME / "home"
    )


@pytest.fixture(scope="session")
def seeded(settings: Settings) -> Settings:
    """A small synthetic warehouse (seeded once per session) in schema ``warehouse``."""
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    warehouse.seed(settings, World(WAREHOUSE_CUSTOMERS, WAREHOUSE_START, seed=11), WAREHOUSE_DAYS)
    return settings


@pytest.fixture(scope="module")
def isolated(
    server_url: str, session_id: str, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    """A module's own database with the serving schema and a small seeded warehouse.

    For tests that change the registry (promotions, rollbacks) without touching others.
    """
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    name = f"nightscore_test_{session_id}_{request.module.__name__.rsplit('.', 1)[-1][:20]}"
    url = create_database(server_url, name)
    serving.init(url, usecase.load_all())
    s = Settings(database_url=url, warehouse_url=url, home=_SESSION_HOME / name)
    warehouse.seed(s, World(WAREHOUSE_CUSTOMERS, WAREHOUSE_START, seed=11), WAREHOUSE_DAYS)
    yield s
    drop_database(server_url, name)


@pytest.fixture
def fresh_schema(settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a brand-new, empty warehouse schema (dropped afterwards)."""
    from dataclasses import replace

    name = f"wh_{secrets.token_hex(4)}"
    yield replace(settings, warehouse_schema=name, home=settings.home / name)
    conn = db.connect(settings.database_url, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def airflow_env(settings: Settings, server_url: str, session_id: str) -> Iterator[dict[str, str]]:
    """Environment for ``airflow`` subprocesses: its own metadata database, migrated once."""
    from pipeline.faces import airflow_env as af

    name = f"nightscore_airflow_{session_id}"
    meta = create_database(server_url, name)
    os.environ["NIGHTSCORE_AIRFLOW_DATABASE_URL"] = meta
    env = os.environ | af.airflow_env(settings)
    env["NIGHTSCORE_DATABASE_URL"] = settings.database_url
    env["NIGHTSCORE_WAREHOUSE_URL"] = settings.warehouse_url
    env["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
    subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    yield env
    os.environ.pop("NIGHTSCORE_AIRFLOW_DATABASE_URL", None)
    drop_database(server_url, name)
