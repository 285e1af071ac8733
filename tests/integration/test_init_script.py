"""docker/init.sh (airflow-init of docker-compose.yml), run outside Docker against the real
PostgreSQL: a fresh metadata database and a fresh serving database per test, dropped after.

Nothing is stubbed: ``airflow db migrate``, ``airflow users create`` (FAB), ``nightscore db
init`` and ``chown`` run for real (chown to uid 50000 when the tests run as root, as CI
does; to the current uid otherwise).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from pipeline.conf.urls import sqlalchemy_url, with_database
from pipeline.core.paths import REPO_ROOT
from tests.conftest import create_database, drop_database

pytestmark = pytest.mark.slow

INIT = REPO_ROOT / "docker" / "init.sh"
UID = 50000 if os.getuid() == 0 else os.getuid()


@pytest.fixture
def databases(server_url: str) -> Iterator[tuple[str, str]]:
    """(metadata URL, serving URL): two new databases on the test server."""
    tag = secrets.token_hex(4)
    names = (f"nightscore_init_meta_{tag}", f"nightscore_init_serving_{tag}")
    urls = tuple(create_database(server_url, name) for name in names)
    yield urls  # type: ignore[misc]
    for name in names:
        drop_database(server_url, name)


def init_env(tmp_path: Path, metadata_url: str, serving_url: str, password: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    bin_dir = str(Path(sys.executable).parent)
    (tmp_path / "dags").mkdir(exist_ok=True)
    return {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(metadata_url),
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
        ),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW_UID": str(UID),
        "NIGHTSCORE_HOME": str(tmp_path / "volumes" / "nightscore-home"),
        "NIGHTSCORE_DATABASE_URL": serving_url,
        "AIRFLOW_ADMIN_USERNAME": "ops",
        "AIRFLOW_ADMIN_PASSWORD": password,
        "OMP_NUM_THREADS": "1",
    }


def run_init(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INIT)], env=env, capture_output=True, text=True, timeout=600)


def stored_password(metadata_url: str, username: str) -> str | None:
    conn = psycopg2.connect(metadata_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT password FROM ab_user WHERE username = %s", (username,))
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


def has_schema(url: str, schema: str) -> bool:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def test_init_migrates_creates_the_admin_initializes_serving_and_chowns(
    tmp_path: Path, databases: tuple[str, str]
) -> None:
    from werkzeug.security import check_password_hash

    metadata, serving = databases
    env = init_env(tmp_path, metadata, serving, "first-Pa55")
    done = run_init(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "airflow-init done" in done.stdout

    first = stored_password(metadata, "ops")
    assert first is not None and check_password_hash(first, "first-Pa55")
    assert has_schema(serving, "ml") and has_schema(serving, "predictions")
    for folder in (Path(env["AIRFLOW_HOME"]) / "logs", Path(env["NIGHTSCORE_HOME"])):
        assert folder.stat().st_uid == UID, folder
        assert all(p.stat().st_uid == UID for p in folder.rglob("*")), folder
    assert (Path(env["AIRFLOW_HOME"]) / "plugins").is_dir()

    # A second `up` with another password in .env: the user is kept, the password follows .env.
    again = run_init(env | {"AIRFLOW_ADMIN_PASSWORD": "second-Pa55"})
    assert again.returncode == 0, again.stdout + again.stderr
    second = stored_password(metadata, "ops")
    assert second is not None and check_password_hash(second, "second-Pa55")
    assert not check_password_hash(second, "first-Pa55")


def test_a_failed_migration_fails_init_and_stops_it_there(
    tmp_path: Path, databases: tuple[str, str]
) -> None:
    metadata, serving = databases
    unreachable = with_database("postgresql://postgres@127.0.0.1:1/", "airflow")
    env = init_env(tmp_path, metadata, serving, "Pa55word")
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = sqlalchemy_url(unreachable)
    done = run_init(env)
    assert done.returncode != 0
    assert "migrating Airflow's metadata database" in done.stdout
    assert "admin user" not in done.stdout
    assert not has_schema(serving, "ml")
    if os.getuid() == 0:
        assert Path(env["NIGHTSCORE_HOME"]).stat().st_uid == 0  # never handed over


def test_a_failed_serving_init_fails_init_after_the_migration(
    tmp_path: Path, databases: tuple[str, str]
) -> None:
    metadata, _ = databases
    missing = with_database(metadata, "nightscore_init_no_such_database")
    env = init_env(tmp_path, metadata, missing, "Pa55word")
    done = run_init(env)
    assert done.returncode != 0
    assert "serving database" in done.stdout
    assert "airflow-init done" not in done.stdout
    assert stored_password(metadata, "ops") is not None


@pytest.mark.parametrize("unset", ["AIRFLOW_ADMIN_PASSWORD", "NIGHTSCORE_DATABASE_URL"])
def test_init_refuses_to_run_without_its_settings(tmp_path: Path, unset: str) -> None:
    env = init_env(tmp_path, "postgresql://x@127.0.0.1:1/a", "postgresql://x@127.0.0.1:1/b", "p")
    del env[unset]
    done = run_init(env)
    assert done.returncode != 0
    assert f"{unset} is not set" in done.stderr
    assert not (tmp_path / "airflow").exists()
