"""Real Airflow services for DAG tests: an API server (and a scheduler) on a free port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from pipeline import airflow_env as af
from pipeline.config import Settings

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float, procs: list[subprocess.Popen]
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(
                    f"{p.args[1:3]} exited with {p.returncode} while waiting for {what}"
                )
        result = probe()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def service_env(
    base_env: dict[str, str], settings: Settings, port: int, logs: Path
) -> dict[str, str]:
    """The Airflow environment with the DAG's connections pointing at ``settings``."""
    return base_env | {
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "nightscore-tests",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(logs / "passwords.json"),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the runs a test asks for
        "AIRFLOW_CONN_NIGHTSCORE_DB": af.connection_json(settings.database_url),
        "AIRFLOW_CONN_NIGHTSCORE_WAREHOUSE": af.connection_json(settings.warehouse_url),
        "NIGHTSCORE_DATABASE_URL": settings.database_url,
        "NIGHTSCORE_WAREHOUSE_URL": settings.warehouse_url,
        "NIGHTSCORE_HOME": str(settings.home),
    }


@contextmanager
def airflow_services(env: dict[str, str], logs: Path, *commands: str) -> Iterator[dict[str, Any]]:
    """Start ``airflow api-server`` plus the given commands (e.g. ``scheduler``); stop them after."""
    port = env["AIRFLOW__API__PORT"]
    procs = []
    try:
        for cmd in ("api-server", *commands):
            args = [AIRFLOW, cmd] + (["--port", port] if cmd == "api-server" else [])
            with (logs / f"{cmd}.log").open("w") as out:
                procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_for("the API server", lambda: ok(f"{base}/api/v2/version"), 180, procs)
        password = json.loads((logs / "passwords.json").read_text())["admin"]
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}
        ).json()
        yield {
            "base": base,
            "headers": {"Authorization": f"Bearer {token['access_token']}"},
            "procs": procs,
        }
    finally:
        af.stop_all(procs)
