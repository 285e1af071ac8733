"""Environment for running the DAGs with a local Airflow (``dags test``, ``standalone``).

This builds environment variables only; it does not import Airflow. Airflow's own
metadata lives in a separate database (``airflow``) on the embedded server, or wherever
``NIGHTSCORE_AIRFLOW_DATABASE_URL`` points.
"""

from __future__ import annotations

import json
import os

from pipeline import embedded
from pipeline.config import REPO_ROOT, Settings, sqlalchemy_url, url_parts, with_database

ENV_AIRFLOW_DB = "NIGHTSCORE_AIRFLOW_DATABASE_URL"


def connection_json(url: str) -> str:
    """An Airflow connection (JSON form) for a PostgreSQL URL; sockets work too."""
    p = url_parts(url)
    conn = {
        "conn_type": "postgres",
        "host": p["host"],
        "port": p["port"] or 5432,
        "login": p["login"],
        "password": p["password"],
        "schema": p["database"],
    }
    return json.dumps({k: v for k, v in conn.items() if v is not None})


def metadata_url(settings: Settings) -> str:
    """SQLAlchemy URL of Airflow's metadata database (created on the embedded server)."""
    configured = os.environ.get(ENV_AIRFLOW_DB)
    if configured:
        return sqlalchemy_url(configured)
    if os.environ.get("NIGHTSCORE_DATABASE_URL"):
        url = with_database(settings.init_url, "airflow")
        embedded.ensure_database(settings.init_url, "airflow")
    else:
        url = embedded.ensure_server(settings.home, embedded.AIRFLOW_DATABASE)
    return sqlalchemy_url(url)


def airflow_env(settings: Settings, port: int = 8080) -> dict[str, str]:
    """Variables that point a local Airflow at these DAGs, databases and connections."""
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url(settings),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW_CONN_NIGHTSCORE_DB": connection_json(settings.database_url),
        "AIRFLOW_CONN_NIGHTSCORE_WAREHOUSE": connection_json(settings.warehouse_url),
        "NIGHTSCORE_HOME": str(settings.home),
        "NO_PROXY": "*",
    }


def shell_exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={_shell_quote(v)}" for k, v in env.items())


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"
