"""A local Airflow for these DAGs: its environment (``dags test``) and its processes.

The environment is variables only; nothing here imports Airflow. Airflow's own metadata
lives in a separate database (``airflow``) on the embedded server, or wherever
``NIGHTSCORE_AIRFLOW_DATABASE_URL`` points.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pipeline.conf.config import Settings, private_dir
from pipeline.conf.urls import sqlalchemy_url, url_parts, with_database
from pipeline.core.paths import REPO_ROOT

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
    from pipeline.conf import embedded

    if os.environ.get("NIGHTSCORE_DATABASE_URL"):
        url = with_database(settings.init_url, "airflow")
        embedded.ensure_database(settings.init_url, "airflow")
    else:
        url = embedded.ensure_server(settings.home, embedded.AIRFLOW_DATABASE)
    return sqlalchemy_url(url)


def airflow_env(settings: Settings, port: int = 8080) -> dict[str, str]:
    """Variables that point a local Airflow at these DAGs, databases and connections."""
    home = private_dir(settings.home / "airflow")
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        # the reports plugin (served by the API server at /nightscore, linked from runs)
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # sized to the machine: task processes and API workers, not Airflow's 32 and 4. Two
        # API workers: one serves the UI while the other answers the tasks' heartbeats
        "AIRFLOW__CORE__PARALLELISM": str(machine_slots()),
        "AIRFLOW__API__WORKERS": "2",
        # a task is killed after this many heartbeats in a row the API server did not
        # answer in time (one every 5 s at least): Airflow's default 3 gave up on training
        # that kept both cores busy; 24 allow at least two minutes
        "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "24",
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


# ``airflow dags test`` runs every task in its own (the command's) process and writes its log to
# its output only: no file under [logging] base_log_folder. The TaskInstance keeps the
# machine's hostname, so the API server, finding no file, asks that host's log server
# (port 8793), which nothing runs: "Could not read served logs". (``--use-executor`` would
# write the files, but needs a running API server and starts a process per task.) The
# output marks each task's part, with its id.
_TASK_STARTS = "[DAG TEST] starting task_id="
_TASK_ENDS = "[DAG TEST] end task task_id="
_TI_ID = re.compile(r"ti_id=([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_CONSOLE_LINE = re.compile(r"(\d{4}-\d\d-\d\dT[\d:.]+Z) \[(\w+) *\] (.*)")


def task_log_parts(output: str) -> dict[str, list[str]]:
    """The lines of each task in a ``dags test`` output, by task instance id (a task that
    waited for a person or a trigger and resumed has all its parts, in order)."""
    parts: dict[str, list[str]] = {}
    part: list[str] | None = None
    for line in output.splitlines():
        if _TASK_STARTS in line:
            part = []
        if part is None:
            continue
        part.append(line)
        if _TASK_ENDS in line:
            found = next((m for m in map(_TI_ID.search, part) if m), None)
            if found:
                parts.setdefault(found[1], []).extend(part)
            part = None
    return parts


def file_task_logs(output: Path, env: dict[str, str]) -> list[Path]:
    """Write the task logs of the ``dags test`` whose output is ``output`` where the API
    server reads them: each task's file under the ``[logging] base_log_folder`` of ``env``
    (the environment it ran with), named by its run's log filename template. Returns the
    files written."""
    from datetime import UTC

    import jinja2

    from pipeline.store import db

    parts = task_log_parts(output.read_text(errors="replace"))
    if not parts:
        return []
    folder = Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
    rows = db.records(
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        "SELECT ti.id::text AS id, ti.dag_id, ti.run_id, ti.task_id, ti.map_index, "
        "ti.try_number, coalesce(r.logical_date, r.run_after) AS date, t.filename "
        "FROM task_instance ti "
        "JOIN dag_run r ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id "
        "JOIN log_template t ON t.id = r.log_template_id WHERE ti.id = ANY(%s::uuid[])",
        (list(parts),),
    )
    written = []
    for row in rows:
        ti = {k: row[k] for k in ("dag_id", "run_id", "task_id", "map_index", "try_number")}
        name = jinja2.Template(row["filename"]).render(
            ti=ti, ts=row["date"].astimezone(UTC).isoformat(), try_number=row["try_number"]
        )
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(_log_record(line) + "\n" for line in parts[row["id"]]))
        written.append(path)
    return written


def _log_record(line: str) -> str:
    """A line of the console output as the JSON record a task's log file holds."""
    console = _CONSOLE_LINE.fullmatch(line)
    if console is None:
        return json.dumps({"event": line})
    timestamp, level, event = console.groups()
    return json.dumps({"timestamp": timestamp, "level": level, "event": event})


# CeleryExecutor, as docker-compose.yml runs it (tests/unit/test_compose.py holds the two
# together; tests/dags/test_celery.py runs a scheduler and two workers with them). A worker
# runs as many task processes as its machine has cores, each on one thread: scikit-learn's
# OpenMP, BLAS and Arrow's CPU pool (which follows OMP_NUM_THREADS) would otherwise each
# start a thread per core in every task process. One message reserved per process (with
# Airflow's late acks): a busy worker holds no partition back from an idle one.
CELERY_SETTINGS = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    # A message a lost worker took is redelivered after this long; the scheduler has retried
    # its task long before (task_instance_heartbeat_timeout), so the redelivery finds the
    # try over and runs nothing. It must outlast the longest task, or a running task's
    # message is handed to a second worker.
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def celery_env(broker_url: str, metadata_url: str, queue: str = "default") -> dict[str, str]:
    """Variables that run these DAGs on CeleryExecutor: tasks go through ``broker_url`` (Redis)
    to the workers serving ``queue``; task states are kept in the metadata database."""
    return CELERY_SETTINGS | {
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sqlalchemy_url(metadata_url),
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
    }


def machine_slots() -> int:
    """Tasks that may run at once on this machine: one per core, at least 2."""
    return max(2, os.cpu_count() or 2)


def shell_exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={_shell_quote(v)}" for k, v in env.items())


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


# The local Airflow: its components one by one (what `airflow standalone` runs), so that
# every listener binds 127.0.0.1: the API server by its --host, and the log servers of the
# scheduler and triggerer (which bind every interface, with no setting to change it) are
# not started: on one machine the API server reads task logs from the log folder.
LOCAL_COMPONENTS = (
    ("api-server", "--host", "127.0.0.1", "--port", "{port}"),
    ("scheduler", "--skip-serve-logs"),
    ("dag-processor",),
    ("triggerer", "--skip-serve-logs"),
)


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 30) -> None:
    """Terminate every process still running and everything it started (a scheduler's
    LocalExecutor workers, an API server's workers), then kill whatever outlives ``grace``
    seconds.

    A component that exits on TERM usually takes its children with it, but not always in
    time: a worker it forked can outlive it, reparented to init, and would hold its task
    slot (and the metadata database) until it notices.
    """
    import psutil

    family: list[psutil.Process] = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            family += psutil.Process(p.pid).children(recursive=True)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _, alive = psutil.wait_procs(family, timeout=grace / 3)
    for signal_them in ("terminate", "kill"):
        for child in alive:
            with contextlib.suppress(psutil.Error):
                getattr(child, signal_them)()
        _, alive = psutil.wait_procs(alive, timeout=grace / 3)


def run_local(settings: Settings, port: int = 8080, ready: Any = None) -> int:
    """Run Airflow on 127.0.0.1:``port`` with these DAGs until interrupted; returns the exit code.

    ``ready`` (a callable) is called with the API server's URL and the admin password once
    the login exists.
    """
    import signal
    import sys
    import time

    from pipeline.conf.config import private_by_default

    private_by_default()
    env = os.environ | airflow_env(settings, port)
    pid_file = _pid_file(settings.home)
    pid_file.write_text(str(os.getpid()))
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    procs = [
        subprocess.Popen([airflow, *(a.format(port=port) for a in args)], env=env)
        for args in LOCAL_COMPONENTS
    ]
    passwords = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    stop = {"now": False}

    def interrupted(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    announced = False
    parent = os.getppid()
    try:
        while not stop["now"] and all(p.poll() is None for p in procs):
            if os.getppid() != parent:  # whoever started us (make, a shell) is gone
                break
            if not announced and passwords.is_file() and passwords.stat().st_size:
                login = json.loads(passwords.read_text()).get("admin", "")
                if ready is not None:
                    ready(f"http://127.0.0.1:{port}", login)
                announced = True
            time.sleep(0.5)
    finally:
        stop_all(procs)
        pid_file.unlink(missing_ok=True)
    failed = [p.returncode for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    return 0 if stop["now"] or not failed else 1


def _pid_file(home: Path) -> Path:
    """Where a running ``nightscore airflow`` of ``home`` records its process id."""
    return home / "airflow" / "local.pid"


def stop_local(home: Path, grace: float = 90) -> int | None:
    """Stop the ``nightscore airflow`` (``make airflow``) running with ``home``, as Ctrl-C
    would: it stops its components and waits for them. Returns its process id, or None when
    none runs (a stale record of one that died is removed)."""
    import psutil

    pid_file = _pid_file(home)
    if not pid_file.is_file():
        return None
    try:
        process = psutil.Process(int(pid_file.read_text().strip() or 0))
        if "nightscore" not in " ".join(process.cmdline()):
            raise psutil.NoSuchProcess(process.pid)  # the id now names another program
        process.terminate()
        try:
            process.wait(grace)
        except psutil.TimeoutExpired:
            process.kill()
        return process.pid
    except (psutil.Error, ValueError):
        return None
    finally:
        pid_file.unlink(missing_ok=True)
