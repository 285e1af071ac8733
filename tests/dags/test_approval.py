"""``promotion_mode=approval``: the DAG waits at the approval task and proceeds when a person
approves through Airflow's REST API (the same call the UI's approve button makes)."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import httpx
import numpy as np
import pytest

from pipeline.conf.config import Settings
from pipeline.faces import airflow_env as af
from pipeline.store import db, registry
from tests.conftest import SCORE_DATE
from tests.dags.services import AIRFLOW, airflow_services, free_port, service_env, wait_for

# Nights of their own: the session's Airflow metadata is shared by every DAG test, and a
# backfill skips the dates that already have a run (tests/dags/test_backfill.py).
APPROVED_NIGHT = SCORE_DATE - timedelta(days=3)


@pytest.fixture(scope="module")
def api(isolated: Settings, airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """An Airflow API server on a free port, and the environment pointing the DAG at ``isolated``."""
    logs = tmp_path_factory.mktemp("approval")
    env = service_env(airflow_env, isolated, free_port(), logs)
    with airflow_services(env, logs) as svc:
        yield svc | {"env": env, "logs": logs}


def answer_approval(api: dict, day, option: str) -> str:
    """Run the night of ``day`` with ``promotion_mode=approval`` under ``airflow dags test``,
    answer its approval with ``option`` through the REST API (the UI's call) once it waits,
    and return the run id once the run has ended."""
    conf = {"retrain": "always", "promotion_mode": "approval"}
    log = api["logs"] / f"dags-test-{day}.log"
    with log.open("w") as out:
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
        assert "P(challenger better)" in detail["body"] or "first model" in detail["body"]
        # while it waits nothing is published for the date
        assert (
            db.scalar(
                api["settings"].database_url,
                "SELECT count(*) FROM ml.runs WHERE score_date = %s AND status = 'published'",
                (day,),
            )
            == 0
        )
        answer = httpx.patch(
            f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances/approve_promotion/-1/hitlDetails",
            headers=api["headers"],
            json={"chosen_options": [option]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert run.wait(600) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    af.file_task_logs(log, api["env"])  # as make demo does after each night
    return run_id


def run_note(api: dict, run_id: str) -> str:
    r = httpx.get(
        f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/{run_id}", headers=api["headers"]
    )
    assert r.status_code == 200, r.text
    return r.json().get("note") or ""


def task_log(api: dict, run_id: str, task_id: str, map_index: int = -1) -> list[str]:
    """The lines of the task's latest log as the UI gets them from the API server."""
    url = f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances/{task_id}"
    ti = httpx.get(url + (f"/{map_index}" if map_index >= 0 else ""), headers=api["headers"])
    r = httpx.get(
        f"{url}/logs/{ti.json()['try_number']}",
        params={"map_index": map_index},
        headers=api["headers"],
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return [line["event"] for line in r.json()["content"]]


def task_states(api: dict, run_id: str) -> dict[str, str]:
    r = httpx.get(
        f"{api['base']}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances",
        headers=api["headers"],
    )
    return {t["task_id"]: t["state"] for t in r.json()["task_instances"]}


@pytest.mark.slow
def test_approval_mode_waits_for_a_person_then_promotes(isolated: Settings, api: dict) -> None:
    day = APPROVED_NIGHT
    assert registry.champion(isolated, "churn") is None
    run_id = answer_approval(api | {"settings": isolated}, day, "Approve")

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
    ev = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(e) FROM ml.evaluations e WHERE run_id = %s",
        (run_id,),
    )
    assert ev["decision"] == "approved" and ev["reviewed_by"] == "admin" and ev["reviewed_at"]
    assert f"Approved by admin at {ev['reviewed_at'][:10]}" in run_note(api, run_id)

    # each task's own log in the UI, not "Could not read served logs ... 8793"
    for task_id, map_index, own in (
        ("build_features", -1, "Done. Returned value was"),
        ("approve_promotion", -1, "Waiting for response"),  # before the answer
        ("approve_promotion", -1, "Approved. Proceeding"),  # after it
        ("score_partition", 1, "Done. Returned value was"),
    ):
        lines = task_log(api, run_id, task_id, map_index)
        assert not any("served logs" in line or ":8793" in line for line in lines), lines[:5]
        assert any(
            f"starting task_id={task_id} map_index={map_index} " in line for line in lines
        ), lines[:5]
        assert any(own in line for line in lines), lines


@pytest.mark.slow
def test_a_rejection_is_recorded_and_shown_on_the_run(isolated: Settings, api: dict) -> None:
    from pipeline.conf import usecase
    from pipeline.stages import train

    # a champion without the usage features: tonight's challenger is plainly better
    uc = usecase.load("churn")
    trained_as_of = APPROVED_NIGHT
    data = train.training_data(isolated, uc, trained_as_of)
    weak = ["country", "contract_type", "tenure_days", "late_payments_180d", "tickets_90d"]
    model = train.fit(uc, data.table, weak, data.labels)
    champion = train.save_and_register(isolated, uc, trained_as_of, model, weak, data)
    registry.promote(
        isolated,
        "churn",
        champion.version,
        actor="test",
        reason="weak",
        effective_date=trained_as_of,
    )
    # the training window of the approval test's night: its model again, registered before
    day = APPROVED_NIGHT + timedelta(days=1)
    run_id = answer_approval(api | {"settings": isolated}, day, "Reject")

    assert registry.champion(isolated, "churn").version == champion.version
    ev = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(e) FROM ml.evaluations e WHERE run_id = %s",
        (run_id,),
    )
    assert ev["decision"] == "rejected" and ev["reviewed_by"] == "admin"
    assert registry.get(isolated, "churn", ev["challenger"]).status == "shadow"
    note = run_note(api, run_id)
    assert f"Rejected by admin at {ev['reviewed_at'][:10]}" in note
    assert f"{ev['challenger']} kept as shadow; {champion.version} stays champion" in note
    states = task_states(api, run_id)
    assert states["promote_challenger"] == "skipped" and states["record_review"] == "success"
    # the night went on with the champion, and its report says who rejected what
    served = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores WHERE score_date = %s",
        (day,),
    )
    assert served == [champion.version]
    report = db.scalar(
        isolated.database_url,
        "SELECT stages->'write_report'->>'report' FROM ml.runs WHERE run_id = %s",
        (run_id,),
    )
    with open(report) as fh:
        assert "Rejected by admin at" in fh.read()


def raw_get(base: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET a path exactly as written (httpx would normalise the dots away)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.slow
def test_the_plugin_serves_the_reports_behind_the_airflow_login(
    isolated: Settings, api: dict
) -> None:
    """The reports plugin in the real API server: a night's and an evaluation's report by
    URL, a run's redirect, 404s, traversal refused, the login required; the UI's links."""
    from pipeline.conf import usecase
    from pipeline.reports import evaluation_report, report_site
    from pipeline.run import night_report
    from pipeline.stages import evaluate
    from pipeline.store import ledger

    uc = usecase.load("churn")
    day = SCORE_DATE + timedelta(days=9)
    run = ledger.RunContext("churn", day, "manual__plugin-check")
    ledger.start(isolated, run)
    night_report.write_report(isolated, uc, run)
    version = "churn-20241129-plugin00"
    y = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    evaluation_report.write_evaluation_report(
        report_site.evaluation_file(isolated, "churn", version),
        evaluate.Evaluation(
            use_case="churn",
            challenger=version,
            champion=None,
            holdouts=[{"as_of": str(day), "rows": len(y), "positives": 3}],
            verdict=evaluate.Verdict({"challenger": {"roc_auc": 0.7}, "champion": None}, {}, []),
            decision="reject",
            reasons=["plugin check"],
        ),
        y=y,
        p_challenger=np.linspace(0.1, 0.9, len(y)),
        p_champion=None,
    )
    base, auth = api["base"], api["headers"]

    night = httpx.get(f"{base}/{report_site.report_path('churn', day)}", headers=auth)
    assert night.status_code == 200, night.text
    assert night.headers["content-type"].startswith("text/html")
    assert f"churn: night of {day}" in night.text and "manual__plugin-check" in night.text
    evaluation = httpx.get(f"{base}/{report_site.evaluation_path('churn', version)}", headers=auth)
    assert evaluation.status_code == 200 and "Evaluation report: churn" in evaluation.text
    index = httpx.get(f"{base}/nightscore/", headers=auth)
    assert index.status_code == 200 and str(day) in index.text

    # the UI's cookie is as good as a bearer token; no login, no report
    token = auth["Authorization"].split(" ", 1)[1]
    by_cookie = httpx.get(
        f"{base}/{report_site.report_path('churn', day)}", cookies={"_token": token}
    )
    assert by_cookie.status_code == 200
    assert httpx.get(f"{base}/{report_site.report_path('churn', day)}").status_code == 401

    # a run's link redirects to its night
    redirect = httpx.get(
        f"{base}/{report_site.run_path('churn_nightly', run.run_id)}", headers=auth
    )
    assert redirect.status_code == 307
    followed = httpx.get(
        f"{base}/{report_site.run_path('churn_nightly', run.run_id)}",
        headers=auth,
        follow_redirects=True,
    )
    # to the run's own report (each attempt of a date keeps its own)
    attempt = db.scalar(
        isolated.database_url, "SELECT attempt FROM ml.runs WHERE run_id = %s", (run.run_id,)
    )
    assert followed.status_code == 200
    assert str(followed.url).endswith(f"/churn/nightly/{day}-attempt-{attempt}")

    assert httpx.get(f"{base}/nightscore/churn/nightly/1999-01-01", headers=auth).status_code == 404
    assert httpx.get(f"{base}/nightscore/nobody/nightly/{day}", headers=auth).status_code == 404
    for path in (
        "/nightscore/churn/nightly/../../../../../etc/passwd",
        "/nightscore/churn/nightly/..%2f..%2f..%2fetc%2fpasswd",
        "/nightscore/churn/nightly/%2e%2e%2f%2e%2e%2fpasswords.json",
        "/nightscore/churn/evaluation/%2e%2e",
        "/nightscore/churn/%2e%2e/%2e%2e/airflow/passwords.json",
    ):
        status, body = raw_get(base, path, auth)
        assert status in (400, 404), (path, status)
        assert "root:" not in body and "admin" not in body

    # the plugin as the UI sees it: a run tab and links on the report tasks
    plugins = httpx.get(f"{base}/api/v2/plugins", headers=auth).json()["plugins"]
    mine = next(p for p in plugins if p["name"] == "nightscore_reports")
    assert {v["destination"] for v in mine["external_views"]} == {"dag_run", "nav"}
    assert len(mine["global_operator_extra_links"]) == 2
    runs = httpx.get(f"{base}/api/v2/dags/churn_nightly/dagRuns", headers=auth).json()
    if runs.get("dag_runs"):  # the approval test's run, when it ran first
        run_id = runs["dag_runs"][-1]["dag_run_id"]
        links = httpx.get(
            f"{base}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances/write_report/links",
            headers=auth,
        ).json()
        assert links["extra_links"]["Nightly report"].endswith(
            report_site.run_path("churn_nightly", run_id)
        )
        assert links["extra_links"]["Evaluation report"] is None
        evaluated = httpx.get(
            f"{base}/api/v2/dags/churn_nightly/dagRuns/{run_id}/taskInstances/evaluate_challenger/links",
            headers=auth,
        ).json()["extra_links"]["Evaluation report"]
        page = httpx.get(evaluated, headers=auth, follow_redirects=True)
        assert page.status_code == 200 and "Evaluation report: churn" in page.text
