"""``promotion_mode=approval``: the DAG waits at the approval task and proceeds when a person
approves through Airflow's REST API (the same call the UI's approve button makes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from pipeline import airflow_env as af
from pipeline import db, registry
from pipeline.config import Settings
from tests.conftest import SCORE_DATE

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe, timeout: float, procs: list[subprocess.Popen]):
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


@pytest.fixture(scope="module")
def api(isolated: Settings, airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """An Airflow API server on a free port, and the environment pointing the DAG at ``isolated``."""
    port = free_port()
    logs = tmp_path_factory.mktemp("approval")
    env = airflow_env | {
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": "nightscore-tests",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(logs / "passwords.json"),
        "AIRFLOW_CONN_NIGHTSCORE_DB": af.connection_json(isolated.database_url),
        "AIRFLOW_CONN_NIGHTSCORE_WAREHOUSE": af.connection_json(isolated.warehouse_url),
        "NIGHTSCORE_DATABASE_URL": isolated.database_url,
        "NIGHTSCORE_WAREHOUSE_URL": isolated.warehouse_url,
        "NIGHTSCORE_HOME": str(isolated.home),
    }
    with (logs / "api-server.log").open("w") as out:
        server = subprocess.Popen(
            [AIRFLOW, "api-server", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the API server", lambda: _ok(f"{base}/api/v2/version"), 180, [server])
        password = json.loads((logs / "passwords.json").read_text())["admin"]
        token = httpx.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}
        ).json()
        yield {
            "base": base,
            "env": env,
            "headers": {"Authorization": f"Bearer {token['access_token']}"},
            "logs": logs,
        }
    finally:
        server.terminate()
        server.wait(30)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_approval_mode_waits_for_a_person_then_promotes(isolated: Settings, api: dict) -> None:
    day = SCORE_DATE + timedelta(days=5)
    conf = {"retrain": "always", "promotion_mode": "approval"}
    with (api["logs"] / "dags-test.log").open("w") as out:
        run = subprocess.Popen(
            [AIRFLOW, "dags", "test", "churn_nightly", day.isoformat(), "--conf", json.dumps(conf)],
            env=api["env"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def pending():
            r = httpx.get(
                f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/~/hitlDetails",
                headers=api["headers"],
                timeout=5,
            )
            if r.status_code != 200:
                return None
            waiting = [
                d
                for d in r.json()["hitl_details"]
                if d["task_instance"]["task_id"] == "approve_promotion"
                and not d["response_received"]
            ]
            return waiting[0] if waiting else None

        detail = wait_for("the approval task", pending, 600, [run])
        run_id = detail["task_instance"]["dag_run_id"]
        assert "Promote churn-" in detail["subject"] and "roc_auc" in detail["body"]
        # while it waits nothing is promoted and nothing is published for the date
        assert registry.champion(isolated, "churn") is None
        assert (
            db.scalar(
                isolated.database_url,
                "SELECT count(*) FROM ml.runs WHERE score_date = %s AND status = 'published'",
                (day,),
            )
            == 0
        )

        answer = httpx.patch(
            f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances/approve_promotion/-1/hitlDetails",
            headers=api["headers"],
            json={"chosen_options": ["Approve"]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert run.wait(600) == 0, (api["logs"] / "dags-test.log").read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()

    champion = registry.champion(isolated, "churn")
    assert champion is not None
    promo = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(p) FROM ml.promotions p ORDER BY promotion_id DESC LIMIT 1",
    )
    assert promo["version"] == champion.version and promo["actor"] == "approval:admin"
    assert promo["run_id"] == run_id
    served = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores WHERE score_date = %s",
        (day,),
    )
    assert served == [champion.version]
