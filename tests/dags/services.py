"""Real Airflow services for DAG tests: an API server (and a scheduler, workers...) on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from pipeline.conf.config import Settings
from pipeline.conf.urls import sqlalchemy_url
from pipeline.faces import airflow_env as af
from tests.conftest import create_database, drop_database

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
def own_metadata(env: dict[str, str], server_url: str, name: str) -> Iterator[dict[str, str]]:
    """``env`` on an Airflow metadata database of its own (migrated, the DAGs serialized),
    where no other test's runs hold a DAG's one active run; dropped after."""
    meta = create_database(server_url, name)
    env = env | {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sqlalchemy_url(meta)}
    try:
        for command in (["db", "migrate"], ["dags", "reserialize"]):
            subprocess.run(
                [AIRFLOW, *command], env=env, check=True, capture_output=True, timeout=600
            )
        yield env
    finally:
        drop_database(server_url, name)


@dataclass(frozen=True)
class Component:
    """An Airflow command run beside the API server, with variables of its own."""

    name: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def airflow_services(
    env: dict[str, str], logs: Path, *commands: str | Component
) -> Iterator[dict[str, Any]]:
    """Start ``airflow api-server`` plus the given commands (e.g. ``scheduler``); stop them after.

    Each runs in a session of its own: stopping one stops what it forked too."""
    port = env["AIRFLOW__API__PORT"]
    components = [Component("api-server", ("api-server", "--port", port))] + [
        Component(c, (c,)) if isinstance(c, str) else c for c in commands
    ]
    procs: dict[str, subprocess.Popen] = {}
    try:
        for c in components:
            with (logs / f"{c.name}.log").open("w") as out:
                procs[c.name] = subprocess.Popen(
                    [AIRFLOW, *c.args],
                    env=env | c.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        base = f"http://127.0.0.1:{port}"
        wait_for("the API server", lambda: ok(f"{base}/api/v2/version"), 180, list(procs.values()))
        password = json.loads((logs / "passwords.json").read_text())["admin"]
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}
        ).json()
        yield {
            "base": base,
            "headers": {"Authorization": f"Bearer {token['access_token']}"},
            "procs": list(procs.values()),
            "by_name": procs,
        }
    finally:
        af.stop_all(list(procs.values()))
        for p in procs.values():
            kill_session(p.pid)


class Timings:
    """Seconds a test measured, printed (``pytest -s``) and kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: dict[str, float] = {}

    def record(self, **seconds: float) -> None:
        for name, value in seconds.items():
            self.found[name] = round(value, 1)
            print(f"\n{name}: {self.found[name]} s")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.found, indent=2) + "\n")

    @contextmanager
    def flow(self, name: str) -> Iterator[None]:
        """Record how long the block takes (nothing if it fails)."""
        began = time.monotonic()
        yield
        self.record(**{name: time.monotonic() - began})


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except OSError:
            continue
    return members


def kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of session ``sid`` at once, as a lost machine would stop them
    (a task runner sits in a process group of its own, but stays in its worker's session)."""
    deadline = time.monotonic() + timeout
    while members := session_members(sid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {members} of session {sid} outlived SIGKILL")
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        time.sleep(0.1)
