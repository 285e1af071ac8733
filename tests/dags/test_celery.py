"""Scale-out on CeleryExecutor: a real scheduler, DAG processor and API server, and two
``airflow celery worker`` processes, with Redis as the broker and PostgreSQL for Airflow's
metadata and Celery's results (the settings of docker-compose.yml: ``af.CELERY_SETTINGS``).
``churn_nightly`` scores its population in 4 hash partitions in a pool of 4 slots (a copy of
the churn use case with ``serving.partitions: 4`` and ``serving.pool: scoring``), each
pausing a few seconds at the ``score_partition`` fault point so that the test can see them
running.

In one night: the partitions run on both workers at once; then a worker is SIGKILLed while
it scores a partition, with everything it forked (its session), as a lost machine would
be: the scheduler notices the missing heartbeats, the partition is retried on the other
worker, and the published night holds every entity of the night's snapshot exactly once.

Each worker reports its own host name to Airflow (``tests/dags/worker_host.py``), as two
machines would. Timings are printed (``pytest -s``) and written to
``.nightscore/test-artifacts/celery/timings.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
import redis

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.paths import REPO_ROOT
from pipeline.faces import airflow_env as af
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE
from tests.dags.services import (
    AIRFLOW,
    Component,
    Timings,
    airflow_services,
    free_port,
    kill_session,
    own_metadata,
    service_env,
    wait_for,
)

REDIS = os.environ.get("NIGHTSCORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
ARTIFACTS = REPO_ROOT / ".nightscore" / "test-artifacts" / "celery"
UC = usecase.load("churn")
PARTITIONS = 4
POOL = "scoring"  # as many slots as partitions: two workers of two processes each
PAUSE_SECONDS = 8  # each partition pauses this long, long enough to be seen running
# How soon the scheduler gives up on a task that stopped heartbeating (Airflow's default is
# 300 s; the workers' supervisors heartbeat every 5 s), and how often it looks.
HEARTBEAT_TIMEOUT = 30
WORKERS = ("worker-a", "worker-b")


def redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS, socket_timeout=2).ping())
    except redis.RedisError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not redis_answers(), reason=f"no Redis answers at {REDIS} (the Celery broker)"
    ),
]


@pytest.fixture(scope="module")
def usecases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The churn use case with 4 score partitions (the DAG maps one task over each) taking
    slots of the ``scoring`` pool."""
    root = tmp_path_factory.mktemp("usecases")
    churn = shutil.copytree(UC.source.parent, root / "churn")
    config = churn / UC.source.name
    text = config.read_text()
    old = f"  partitions: {UC.serving.partitions}\n"
    assert old in text
    config.write_text(text.replace(old, f"  partitions: {PARTITIONS}\n  pool: {POOL}\n"))
    return root


@pytest.fixture(scope="module")
def champion(isolated: Settings) -> str:
    """A champion, so that the nights through Celery only score (``retrain: never``)."""
    night = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="celery-champion")
    assert night["evaluation"]["decision"] == "promote"
    return str(night["model_version"])


@pytest.fixture(scope="module")
def celery(
    isolated: Settings,
    champion: str,
    usecases: Path,
    airflow_env: dict[str, str],
    server_url: str,
    session_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """Scheduler, DAG processor (it runs the heartbeat-timeout callbacks) and two workers on a
    metadata database, a Celery queue and Redis keys of this session's own."""
    logs = tmp_path_factory.mktemp("celery")
    tag = f"nightscore-{session_id}"
    env = service_env(airflow_env, isolated, free_port(), logs) | {
        "NIGHTSCORE_USECASES": str(usecases),
        "PYTHONPATH": str(REPO_ROOT),  # the workers import tests.dags.worker_host
        "NIGHTSCORE_FAULT_PAUSE": "score_partition",
        "NIGHTSCORE_FAULT_PAUSE_SECONDS": str(PAUSE_SECONDS),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # a partition the lost worker had taken from the queue but not started stays
        # queued until this (Airflow's default: 600 s), then the scheduler queues it again
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": f"{tag}:",
        # the tasks' queue is serialized with the DAG (own_metadata reserializes it first)
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": tag,
    }
    with own_metadata(env, server_url, f"nightscore_airflow_{session_id}_celery") as env:
        env |= af.celery_env(REDIS, env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], queue=tag)
        for command in (
            ["pools", "set", POOL, str(PARTITIONS), "score partitions"],
            ["dags", "unpause", "churn_nightly"],
        ):
            subprocess.run(
                [AIRFLOW, *command], env=env, check=True, capture_output=True, timeout=300
            )
        workers = [
            Component(
                name,
                (
                    *("celery", "worker", "--celery-hostname", f"{name}.{tag}@%h"),
                    *("--queues", tag, "--skip-serve-logs", "--without-gossip", "--without-mingle"),
                ),
                {
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.dags.worker_host.hostname",
                    "NIGHTSCORE_TEST_WORKER_HOST": name,
                },
            )
            for name in WORKERS
        ]
        try:
            with airflow_services(env, logs, "scheduler", "dag-processor", *workers) as svc:
                for name in WORKERS:
                    wait_for(
                        f"{name} to connect to Redis",
                        lambda name=name: " ready." in (logs / f"{name}.log").read_text(),
                        180,
                        svc["procs"],
                    )
                yield svc | {"env": env, "logs": logs}
            left = started_with("AIRFLOW__OPERATORS__DEFAULT_QUEUE", tag)
            assert not left, f"processes left running: {left}"
        finally:
            broker = redis.Redis.from_url(REDIS)
            for key in broker.scan_iter(match=f"{tag}:*"):
                broker.delete(key)


def started_with(name: str, value: str) -> list[str]:
    """The command lines of live processes whose environment has ``name=value``."""
    found = []
    for p in psutil.process_iter(["environ", "cmdline", "status"]):
        environ = p.info["environ"] or {}
        if environ.get(name) == value and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(" ".join(p.info["cmdline"] or []))
    return found


@pytest.fixture(scope="module")
def timings() -> Timings:
    return Timings(ARTIFACTS / "timings.json")


# -- the runs, as Airflow's REST API shows them ------------------------------------------


def api(svc: dict[str, Any], path: str, **params: Any) -> Any:
    r = httpx.get(
        f"{svc['base']}/api/v2/dags/churn_nightly/{path}",
        headers=svc["headers"],
        params=params,
        timeout=30,
    )
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def trigger(svc: dict[str, Any], day: date, run_id: str) -> None:
    r = httpx.post(
        f"{svc['base']}/api/v2/dags/churn_nightly/dagRuns",
        headers=svc["headers"],
        json={
            "dag_run_id": run_id,
            "logical_date": f"{day.isoformat()}T00:00:00Z",
            "conf": {"retrain": "never"},
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text


def partitions(svc: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    """The run's ``score_partition`` task instances (their newest tries), by map index."""
    tis = api(svc, f"dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]
    return sorted(
        (ti for ti in tis if ti["task_id"] == "score_partition"), key=lambda ti: ti["map_index"]
    )


def finished(svc: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The run once it has ended (failing the test at once if it failed)."""
    run = api(svc, f"dagRuns/{run_id}")
    if run["state"] == "failed":
        failed = [
            (ti["task_id"], ti["map_index"], ti["hostname"])
            for ti in api(svc, f"dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]
            if ti["state"] == "failed"
        ]
        raise AssertionError(f"{run_id} failed: {failed}")
    return run if run["state"] == "success" else None


def at(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def assert_published_once(settings: Settings, svc: dict[str, Any], run_id: str, day: date) -> int:
    """The served night is ``day``'s and holds the run's snapshot population, each entity once."""
    snapshot = api(svc, f"dagRuns/{run_id}/taskInstances/build_features/xcomEntries/return_value")[
        "value"
    ]
    if isinstance(snapshot, str):
        snapshot = json.loads(snapshot)
    population = pq.read_table(snapshot["path"], columns=[UC.entity.key])[UC.entity.key]
    population = sorted(population.to_pylist())
    served = db.scalar(
        settings.database_url,
        f"SELECT json_build_object('dates', array_agg(DISTINCT score_date), 'keys', "
        f"array_agg({UC.entity.key} ORDER BY {UC.entity.key})) FROM predictions.{UC.score_table}_latest",
    )
    assert served["dates"] == [day.isoformat()]
    assert len(population) == len(set(population)) == snapshot["rows"]
    assert served["keys"] == population  # sorted: none missing, none twice, nothing else
    ledger = db.scalar(
        settings.database_url,
        "SELECT json_build_object('status', status, 'rows', rows_published) FROM ml.runs "
        "WHERE run_id = %s",
        (run_id,),
    )
    assert ledger == {"status": "published", "rows": len(population)}
    return len(population)


# -- the tests ---------------------------------------------------------------------------


def test_partitions_run_on_both_workers_and_a_killed_worker_is_replaced_by_the_other(
    celery: dict[str, Any], isolated: Settings, timings: Timings
) -> None:
    """One night: its partitions score on both workers at once; then one worker is killed
    mid-partition, and the other rescores what it held."""
    day, run_id = SCORE_DATE + timedelta(days=1), "celery-night"
    trigger(celery, day, run_id)
    began = time.time()

    def running_partitions() -> list[dict[str, Any]]:
        return [ti for ti in partitions(celery, run_id) if ti["state"] == "running"]

    def on_both() -> list[dict[str, Any]] | None:
        running = running_partitions()
        return running if {ti["hostname"] for ti in running} == set(WORKERS) else None

    running = wait_for("partitions running on both workers", on_both, 600, celery["procs"])
    both_at = time.time()
    assert {ti["pool"] for ti in running} == {POOL}
    victim = running[0]["hostname"]
    worker = celery["by_name"][victim]
    kill_session(worker.pid)  # the worker, its pool and the task processes, at once
    killed_at = time.time()
    worker.wait(30)
    at_kill = partitions(celery, run_id)
    lost = sorted(
        ti["map_index"] for ti in at_kill if ti["state"] == "running" and ti["hostname"] == victim
    )
    assert lost, f"{victim} was killed with no partition running"
    # a partition the victim had taken from the queue but not started: queued again later
    held = {ti["map_index"] for ti in at_kill if ti["state"] == "queued"}
    survivor = next(name for name in WORKERS if name != victim)
    alive = [p for p in celery["procs"] if p is not worker]
    run = wait_for(f"{run_id} to succeed", lambda: finished(celery, run_id), 900, alive)

    parts = partitions(celery, run_id)
    assert [ti["map_index"] for ti in parts] == list(range(PARTITIONS))
    assert all(ti["state"] == "success" for ti in parts), parts
    retried = {ti["map_index"]: ti for ti in parts if ti["map_index"] in lost}
    detected: list[float] = []  # when the scheduler failed each lost try
    for map_index, ti in retried.items():
        assert ti["try_number"] == 2 and ti["hostname"] == survivor, ti
        tries = api(celery, f"dagRuns/{run_id}/taskInstances/score_partition/{map_index}/tries")
        first = next(t for t in tries["task_instances"] if t["try_number"] == 1)
        assert (first["hostname"], first["state"]) == (victim, "failed"), first
        detected.append(at(first["end_date"]))
    assert all(
        ti["try_number"] == 1 or ti["map_index"] in held
        for ti in parts
        if ti["map_index"] not in lost
    ), (parts, held)
    rows = assert_published_once(isolated, celery, run_id, day)
    print(f"\n{victim} killed scoring partitions {lost}; {survivor} rescored them; {rows} rows")
    timings.record(
        both_workers_scoring_after=both_at - began,
        kill_to_failed_try=min(detected) - killed_at,
        kill_to_retry_start=min(at(ti["start_date"]) for ti in retried.values()) - killed_at,
        killed_run=at(run["end_date"]) - at(run["start_date"]),
    )
