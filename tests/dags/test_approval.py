"""``promotion_mode=approval``: the DAG waits at the approval task and proceeds when a person
approves through Airflow's REST API (the same call the UI's approve button makes)."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import httpx
import pytest

from pipeline import db, registry
from pipeline.config import Settings
from tests.conftest import SCORE_DATE
from tests.dags.services import AIRFLOW, airflow_services, free_port, service_env, wait_for


@pytest.fixture(scope="module")
def api(isolated: Settings, airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """An Airflow API server on a free port, and the environment pointing the DAG at ``isolated``."""
    logs = tmp_path_factory.mktemp("approval")
    env = service_env(airflow_env, isolated, free_port(), logs)
    with airflow_services(env, logs) as svc:
        yield svc | {"env": env, "logs": logs}


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
