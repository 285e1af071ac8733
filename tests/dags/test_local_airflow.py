"""``nightscore airflow`` (what ``make airflow`` runs): every listener binds 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipeline.conf.config import Settings
from tests.dags.services import free_port, ok, wait_for

NIGHTSCORE = str(Path(sys.executable).with_name("nightscore"))


def listening(root: psutil.Process) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the process tree listens on."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = " ".join(proc.cmdline()[1:3])
        except psutil.Error:
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


@pytest.mark.slow
def test_the_local_airflow_listens_on_loopback_only(
    settings: Settings, airflow_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = airflow_env | {
        "NIGHTSCORE_HOME": str(tmp_path / "home"),
        "NIGHTSCORE_DATABASE_URL": settings.database_url,
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    with (tmp_path / "airflow.log").open("w") as out:
        proc = subprocess.Popen(
            [NIGHTSCORE, "airflow", "--port", str(port)], env=env, stdout=out, stderr=out
        )
    try:
        wait_for(
            "the API server", lambda: ok(f"http://127.0.0.1:{port}/api/v2/version"), 240, [proc]
        )
        tree = psutil.Process(proc.pid)
        wait_for(
            "the scheduler, DAG processor and triggerer",
            lambda: len(tree.children()) >= 4,
            120,
            [proc],
        )
        sockets = listening(tree)
        assert any(p == port for _, p, _ in sockets), sockets
        assert all(ip in ("127.0.0.1", "::1") for ip, _, _ in sockets), sockets
        assert not [s for s in sockets if s[1] in (8793, 8794)]  # no log servers
        assert "login: admin" in (tmp_path / "airflow.log").read_text()
        # sized to the machine (pipeline.faces.airflow_env.machine_slots task processes, one API
        # worker), not Airflow's 32 and 4
        assert len(tree.children(recursive=True)) <= 16, [
            p.cmdline()[:3] for p in tree.children(recursive=True)
        ]
        family = tree.children(recursive=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
    # a TERM stops every process it started: scheduler, triggerer, API server and theirs
    # (a zombie has exited: it waits only for its parent, or init, to collect its status)
    _, alive = psutil.wait_procs(family, timeout=30)
    running = [p for p in alive if _running(p)]
    assert not running, [_described(p) for p in running]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _described(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:3])
    except psutil.Error as exc:
        return f"pid {proc.pid}: {exc}"
