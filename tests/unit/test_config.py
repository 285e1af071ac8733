from __future__ import annotations

import pytest

from pipeline.conf import config, urls
from pipeline.core.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql://u:p@h:5432/d"),
        ("postgresql+psycopg2://u@h/d", "postgresql://u@h/d"),
        ("postgresql://u@h/d?sslmode=require", "postgresql://u@h/d?sslmode=require"),
        ("mysql+pymysql://u@h/d", "mysql+pymysql://u@h/d"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert urls.normalize_url(given) == expected


def test_url_without_scheme_is_refused_and_password_hidden() -> None:
    with pytest.raises(ConfigError, match="no scheme") as err:
        urls.normalize_url("//alice:secret@h/d")
    assert "secret" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cr%40t@db.example:6543/serving",
        "postgresql://postgres:@/nightscore?host=/tmp/sock",
        "postgresql://bob@localhost/wh",
    ],
)
def test_url_parts_round_trip(url: str) -> None:
    p = urls.url_parts(url)
    rebuilt = urls.url_from_parts(p["host"], p["port"], p["login"], p["password"], p["database"])  # type: ignore[arg-type]
    assert urls.url_parts(rebuilt) == p


def test_redact_hides_the_password() -> None:
    shown = urls.redact("postgresql://alice:hunter2@h/d")
    assert "hunter2" not in shown and "***" in shown


def test_with_database_keeps_the_socket() -> None:
    url = urls.with_database("postgresql://postgres:@/postgres?host=/tmp/x", "airflow")
    assert url == "postgresql://postgres:@/airflow?host=/tmp/x"


def test_the_local_airflow_is_sized_to_the_machine(tmp_path, monkeypatch) -> None:
    import os

    from pipeline.conf.config import load_settings
    from pipeline.faces import airflow_env

    monkeypatch.setenv("NIGHTSCORE_AIRFLOW_DATABASE_URL", "postgresql://x@127.0.0.1:1/airflow")
    monkeypatch.setenv("NIGHTSCORE_HOME", str(tmp_path / "home"))
    settings = load_settings(database_url="postgresql://x@127.0.0.1:1/serving")
    env = airflow_env.airflow_env(settings, 8123)
    assert env["AIRFLOW__CORE__PARALLELISM"] == str(max(2, os.cpu_count() or 2))
    # one API worker for the UI, one for the tasks' heartbeats, which may be late for two
    # minutes on a machine whose cores are busy before a task is given up
    assert env["AIRFLOW__API__WORKERS"] == "2"
    assert env["AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS"] == "24"
    assert env["AIRFLOW__API__PORT"] == "8123" and env["AIRFLOW__API__HOST"] == "127.0.0.1"


def test_a_dags_test_output_is_split_into_the_logs_of_its_tasks() -> None:
    from pipeline.faces import airflow_env

    a, b = "01a24ea4-7a6b-790d-a286-13ac82f142e6", "01a24ea4-7a6b-790d-a286-13ac82f142e7"

    def task(ti_id: str, task_id: str, *lines: str) -> list[str]:
        return [
            f"2026-12-07T03:55:53.150291Z [info     ] [DAG TEST] starting task_id={task_id} map_index=-1",
            f"2026-12-07T03:55:53.150448Z [info     ] [DAG TEST] running task <TaskInstance: "
            f"d.{task_id} manual__x [scheduled] ti_id={ti_id}>",
            *lines,
            f"2026-12-07T03:55:54.611299Z [info     ] [DAG TEST] end task task_id={task_id} map_index=-1",
        ]

    output = [
        "2026-12-07T03:55:31.476998Z [info     ] Created dag run.",
        *task(a, "approve", "Waiting for response"),
        *task(b, "other", "a traceback line"),
        *task(a, "approve", "Approved. Proceeding"),  # resumed after the answer
        "2026-12-07T03:56:00.000000Z [info     ] Marking run successful",
    ]
    parts = airflow_env.task_log_parts("\n".join(output))
    assert list(parts) == [a, b]
    assert parts[a] == task(a, "approve", "Waiting for response") + task(
        a, "approve", "Approved. Proceeding"
    )
    assert parts[b] == task(b, "other", "a traceback line")


def test_the_home_is_private_but_an_embedded_server_can_reach_its_data(tmp_path) -> None:
    import stat

    home = tmp_path / "home"
    config.private_home(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    (home / "pgdata").mkdir()
    home.chmod(0o755)  # what the embedded server sets when it starts as root
    config.private_home(home)
    # others may pass through to pgdata (the server's own user), never list the home
    assert stat.S_IMODE(home.stat().st_mode) == 0o711
