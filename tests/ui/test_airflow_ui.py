"""The Airflow UI as the front door, in a real browser: log in, read what unpausing on
trigger starts (and queue a run of the paused DAG, whose report tab says why it waits),
approve the first model at the approval task (a run queued meanwhile names the run it waits
behind), trigger a night with the default form and watch it succeed, open its report from
the run, backfill two dates from the form, read the nightly graph at fit view.

The flows build on each other, in this order, on one warehouse and one Airflow.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from pipeline.conf.config import Settings
from pipeline.store import db, registry
from tests.dags.services import Timings
from tests.ui.conftest import ARTIFACTS

pytestmark = pytest.mark.slow
DAG = "churn_nightly"


def utc_today() -> date:
    """The day a run triggered now scores: the date of its logical date, in the use case's
    schedule timezone (UTC)."""
    return datetime.now(UTC).date()


TODAY = utc_today()
FLOWS: dict[str, str] = {}  # what a flow leaves for the next ones


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def until(
    what: str, probe: Any, timeout: float, airflow: dict[str, Any], explain: Any = None
) -> Any:
    """``probe()`` once it is truthy; fails after ``timeout`` seconds (saying what
    ``explain()`` finds then), or as soon as an Airflow process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in airflow["procs"]:
            assert p.poll() is None, f"{p.args[1:3]} exited while waiting for {what}"
        found = probe()
        if found:
            return found
        time.sleep(2)
    found = f" ({explain()})" if explain is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{found}")


def runs(world: Settings) -> list[dict[str, Any]]:
    return (
        db.scalar(
            world.database_url,
            "SELECT coalesce(json_agg(r ORDER BY started_at), '[]') FROM ("
            "SELECT run_id, score_date, status, error, params, attempt, started_at FROM ml.runs "
            "WHERE use_case = 'churn') r",
        )
        or []
    )


def published(world: Settings, run_id: str) -> bool:
    rows = [r for r in runs(world) if r["run_id"] == run_id]
    if rows and rows[0]["status"] == "failed":
        raise AssertionError(f"{run_id} failed: {rows[0]['error']}")
    return bool(rows) and rows[0]["status"] == "published"


def airflow_run_state(airflow: dict[str, Any], run_id: str) -> str:
    import httpx

    r = httpx.get(
        f"{airflow['base']}/api/v2/dags/{DAG}/dagRuns/{run_id}", headers=airflow["headers"]
    )
    return str(r.json().get("state")) if r.status_code == 200 else ""


def open_trigger(page: Any) -> None:
    page.goto(f"/dags/{DAG}")
    page.get_by_role("button", name=re.compile("^Trigger")).first.click()
    page.get_by_text("Trigger Dag").first.wait_for()


def choose(page: Any, param: str, option: str) -> None:
    """Pick ``option`` in the form's drop-down for ``param`` (a combobox, not a <select>)."""
    page.get_by_role("dialog").get_by_label(param, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def newest_run_id(world: Settings, before: set[str], kind: str = "manual__") -> str | None:
    """The newest run of ``kind`` the ledger did not have before (the scheduler may start
    its own runs once the form has unpaused the DAG)."""
    fresh = [r["run_id"] for r in runs(world) if r["run_id"] not in before]
    fresh = [r for r in fresh if r.startswith(kind)]
    return fresh[-1] if fresh else None


def submit(page: Any, world: Settings, airflow: dict[str, Any], before: set[str]) -> str:
    """Submit the trigger form; the id of the run it started (once the ledger has it)."""
    page.get_by_test_id("trigger-dag-submit").click()
    return str(until("the run to start", lambda: newest_run_id(world, before), 180, airflow))


def dag_api(airflow: dict[str, Any], method: str, path: str = "", **kw: Any) -> Any:
    """Airflow's REST API on the nightly DAG (``path`` after ``/api/v2/dags/<dag>``)."""
    import httpx

    return httpx.request(
        method,
        f"{airflow['base']}/api/v2/dags/{DAG}{path}",
        headers=airflow["headers"],
        timeout=30,
        **kw,
    )


def airflow_runs(airflow: dict[str, Any]) -> dict[str, str]:
    """Every run of the nightly DAG Airflow has, with its state."""
    r = dag_api(airflow, "GET", "/dagRuns", params={"limit": 100})
    return {d["dag_run_id"]: d["state"] for d in r.json()["dag_runs"]}


def task_states(airflow: dict[str, Any], run_id: str) -> str:
    """The run's tasks and their states, as Airflow has them (for a failure's message)."""
    r = dag_api(airflow, "GET", f"/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    tis = r.json().get("task_instances", [])
    return "tasks: " + ", ".join(
        f"{t['task_id']}{'' if t['map_index'] < 0 else [t['map_index']]} {t['state']}" for t in tis
    )


def answered(airflow: dict[str, Any], run_id: str, task_id: str) -> bool:
    """Whether Airflow has recorded a person's response to the run's ``task_id``."""
    r = dag_api(airflow, "GET", f"/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails")
    return r.status_code == 200 and bool(r.json().get("response_received"))


def approve_at_the_task(page: Any, airflow: dict[str, Any], run_id: str, tries: int = 3) -> None:
    """Open the run's approval task, answer *Approve* in its form, and return once Airflow
    has recorded the answer. A click the page dropped while still loading on a busy machine
    (no response recorded within a minute) is made again, up to ``tries`` times."""
    for attempt in range(1, tries + 1):
        page.goto(f"/dags/{DAG}/runs/{run_id}/tasks/approve_promotion")
        page.get_by_text("Awaiting Input").first.wait_for()
        page.get_by_text(re.compile("^Required Action")).first.click()
        approve = page.get_by_role("button", name=re.compile("^Approve"))
        approve.wait_for()
        if attempt == 1:
            shot(page, "02-approval-form")
        approve.click()
        try:
            until(
                "Airflow to record the approval",
                lambda: answered(airflow, run_id, "approve_promotion"),
                60,
                airflow,
                explain=lambda: task_states(airflow, run_id),
            )
            return
        except AssertionError:
            if attempt == tries:
                raise
            print(f"the approval was not recorded after click {attempt}: answering again")


def open_run_report(page: Any, run_id: str, expected: str) -> Any:
    """Click the run's *Run report* tab; the frame once it shows ``expected``."""
    page.goto(f"/dags/{DAG}/runs/{run_id}")
    page.get_by_text("Run report").first.wait_for()
    page.get_by_text("Run report").first.click()
    report = page.frame_locator("iframe").first
    report.get_by_text(expected).first.wait_for()
    return report


def test_log_in(page: Any, airflow: dict[str, Any], timings: Timings) -> None:
    with timings.flow("log in"):
        page.goto("/")
        page.get_by_label(re.compile("username", re.I)).fill("admin")
        page.get_by_label(re.compile("password", re.I)).fill(airflow["password"])
        page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
        page.get_by_text("Welcome").first.wait_for()
        page.goto("/dags")
        page.get_by_text(DAG).first.wait_for()
    shot(page, "01-dag-list")


def test_the_paused_dags_trigger_form_says_what_unpausing_starts(
    page: Any, airflow: dict[str, Any], timings: Timings
) -> None:
    """A new user's DAG is paused: the form ticks 'Unpause ... on trigger', and says under its
    first field what that starts. Unticked, the run queues, and its report tab says why."""
    assert dag_api(airflow, "GET").json()["is_paused"] is True
    before = set(airflow_runs(airflow))
    with timings.flow("open the paused DAG's trigger form"):
        open_trigger(page)
        dialog = page.get_by_role("dialog")
        unpause = dialog.get_by_text(f"Unpause {DAG} on trigger", exact=True)
        unpause.wait_for()
        dialog.get_by_text(
            "also starts its latest scheduled night (cron 0 0 * * * UTC)"
        ).first.wait_for()
    dialog.get_by_text("also starts its latest scheduled night").first.scroll_into_view_if_needed()
    shot(page, "paused-trigger-form")
    unpause.click()  # untick: trigger this run only
    page.get_by_test_id("trigger-dag-submit").click()
    run_id = until(
        "the run to be queued",
        lambda: next(iter(set(airflow_runs(airflow)) - before), None),
        60,
        airflow,
    )
    try:
        with timings.flow("a queued run's report tab (DAG paused)"):
            report = open_run_report(page, run_id, "This run is queued")
            report.get_by_text("is paused").first.wait_for()
        shot(page, "paused-run-report")
        assert airflow_runs(airflow)[run_id] == "queued"
        assert dag_api(airflow, "GET").json()["is_paused"] is True  # nothing else started
    finally:
        assert dag_api(airflow, "DELETE", f"/dagRuns/{run_id}").status_code == 204


def a_queued_run_names_the_run_it_waits_behind(
    page: Any, airflow: dict[str, Any], running: str, timings: Timings
) -> None:
    """While ``running`` holds the DAG's one active run, a run triggered now stays queued and
    its report tab names ``running`` (then the queued run is deleted, never run)."""
    r = dag_api(airflow, "POST", "/dagRuns", json={"logical_date": None, "note": "queued"})
    assert r.status_code == 200, r.text
    queued = r.json()["dag_run_id"]
    try:
        with timings.flow("a queued run's report tab (behind a running run)"):
            report = open_run_report(page, queued, "waits behind")
            report.get_by_text(running).first.wait_for()
        shot(page, "queued-run-report")
        assert airflow_runs(airflow)[queued] == "queued"
    finally:
        assert dag_api(airflow, "DELETE", f"/dagRuns/{queued}").status_code == 204


def test_approve_the_first_model_at_the_approval_task(
    page: Any, airflow: dict[str, Any], world: Settings, timings: Timings
) -> None:
    with timings.flow("approve a promotion: trigger until it waits for a person"):
        before = {r["run_id"] for r in runs(world)}
        open_trigger(page)
        choose(page, "promotion_mode", "approval")
        run_id = submit(page, world, airflow, before)
        # it waits for a person at approve_promotion: nothing promoted yet
        page.goto(f"/dags/{DAG}/runs/{run_id}/tasks/approve_promotion")
        page.get_by_text("Awaiting Input").first.wait_for(timeout=600_000)
        assert registry.champion(world, "churn") is None
    a_queued_run_names_the_run_it_waits_behind(page, airflow, run_id, timings)
    with timings.flow("approve a promotion: answer until published"):
        approve_at_the_task(page, airflow, run_id)
        until(
            "the approved night to publish",
            lambda: published(world, run_id),
            600,
            airflow,
            explain=lambda: task_states(airflow, run_id),
        )
    champion = registry.champion(world, "churn")
    assert champion is not None
    log = db.scalar(
        world.database_url,
        "SELECT row_to_json(p) FROM ml.promotions p ORDER BY promotion_id DESC LIMIT 1",
    )
    assert log["version"] == champion.version and log["actor"].startswith("approval:admin")
    FLOWS["approved"] = run_id


def test_trigger_with_the_default_form_and_watch_it_succeed(
    page: Any, airflow: dict[str, Any], world: Settings, timings: Timings
) -> None:
    with timings.flow("trigger with the default form"):
        before = {r["run_id"] for r in runs(world)}
        open_trigger(page)
        days = {utc_today().isoformat()}  # the night may start either side of midnight
        assert page.get_by_test_id("trigger-dag-submit").is_enabled()  # the defaults submit as is
        shot(page, "03-trigger-form")
        run_id = submit(page, world, airflow, before)
        days.add(utc_today().isoformat())
        until("the night to publish", lambda: published(world, run_id), 600, airflow)
        until(
            "the run to succeed",
            lambda: airflow_run_state(airflow, run_id) == "success",
            120,
            airflow,
        )
        page.goto(f"/dags/{DAG}/runs/{run_id}")
        page.get_by_text("Success").first.wait_for()
    shot(page, "04-run-succeeded")
    night = next(r for r in runs(world) if r["run_id"] == run_id)
    assert night["score_date"] in days, f"scored {night['score_date']}, triggered on {days}"
    FLOWS["triggered"] = run_id
    FLOWS["night"] = night["score_date"]


def test_open_the_nights_report_from_the_run(
    page: Any, airflow: dict[str, Any], world: Settings, timings: Timings
) -> None:
    run_id = FLOWS["triggered"]
    with timings.flow("open the night's report"):
        page.goto(f"/dags/{DAG}/runs/{run_id}")
        page.get_by_text("Run report").first.click()
        report = page.frame_locator("iframe").first
        report.get_by_text(FLOWS["night"]).first.wait_for()
    shot(page, "05-nightly-report")
    # each run's tab shows its own attempt, also when a later run scored the same date
    attempts = {r["run_id"]: r["attempt"] for r in runs(world)}
    for run in (FLOWS["approved"], run_id):
        with timings.flow("open an earlier attempt's report"):
            report = open_run_report(page, run, f"attempt {attempts[run]}")
            report.get_by_text(run).first.wait_for()
    shot(page, "05b-earlier-attempt-report")


def test_a_monitoring_runs_tab_shows_its_page(
    page: Any, airflow: dict[str, Any], timings: Timings
) -> None:
    import httpx

    dag = "churn_monitoring"
    api = f"{airflow['base']}/api/v2/dags/{dag}"
    assert httpx.patch(api, json={"is_paused": False}, headers=airflow["headers"]).is_success
    started = httpx.post(
        f"{api}/dagRuns", json={"logical_date": None}, headers=airflow["headers"], timeout=30
    )
    assert started.is_success, started.text
    run_id = started.json()["dag_run_id"]

    def state() -> str:
        r = httpx.get(f"{api}/dagRuns/{run_id}", headers=airflow["headers"])
        assert r.json()["state"] != "failed", r.text
        return str(r.json()["state"])

    until("the monitoring run to succeed", lambda: state() == "success", 600, airflow)
    with timings.flow("open a monitoring run's report"):
        page.goto(f"/dags/{dag}/runs/{run_id}")
        page.get_by_text("Run report").first.click()
        report = page.frame_locator("iframe").first
        report.get_by_text(re.compile("^Realized performance")).first.wait_for()
    assert "detail" not in report.locator("body").inner_text()[:200]  # a page, not JSON
    shot(page, "07-monitoring-report")


def test_backfill_two_dates_from_the_form(
    page: Any, airflow: dict[str, Any], world: Settings, timings: Timings
) -> None:
    days = [TODAY - timedelta(days=3), TODAY - timedelta(days=2)]
    with timings.flow("backfill 2 dates"):
        open_trigger(page)
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Run this Dag for a range of dates").click()
        for n, day in enumerate(days):  # From, To: each a pop-over with a date and a time
            dialog.get_by_test_id("datetime-input").nth(n).click()
            page.get_by_placeholder("YYYY/MM/DD").last.fill(day.strftime("%Y/%m/%d"))
            page.get_by_placeholder("HH:mm").last.fill("00:00")
            dialog.get_by_text("Date Range").click()  # closes the pop-over
        dialog.get_by_text(re.compile("^Max Active Runs")).wait_for()
        choose(page, "backfill_model", "current_champion")
        # without this box Airflow's form sends dag_run_conf null: every run gets the defaults
        dialog.get_by_text("Override parameters on existing runs", exact=True).click()
        shot(page, "06-backfill-form")
        dialog.get_by_role("button", name=re.compile("Run Backfill")).click()

        def both() -> bool:
            done = [r for r in runs(world) if r["run_id"].startswith("backfill__")]
            assert not [r for r in done if r["status"] == "failed"], done
            return sorted(r["score_date"] for r in done if r["status"] == "published") == [
                d.isoformat() for d in days
            ]

        until("two published backfill nights", both, 900, airflow)
    backfilled = [r for r in runs(world) if r["run_id"].startswith("backfill__")]
    # the JSON of the form reached every run the backfill created
    assert all(r["params"]["backfill_model"] == "current_champion" for r in backfilled)


GROUPS = ("sources", "features", "model", "scoring", "publish")


def test_the_nightly_graph_reads_at_fit_view(
    page: Any, airflow: dict[str, Any], timings: Timings
) -> None:
    """The triggered night's graph: five collapsed groups and the report, at fit view; then
    every group expanded."""
    page.goto(f"/dags/{DAG}/runs/{FLOWS['triggered']}")
    page.get_by_text("Run report").first.wait_for()
    graph = page.locator(".react-flow")
    with timings.flow("open the nightly graph"):
        page.get_by_title("Show Graph (Press g)").first.click()
        for group in GROUPS:
            graph.get_by_text(group, exact=True).first.wait_for()
        graph.get_by_text("write_report", exact=True).first.wait_for()
    collapse = page.get_by_test_id("collapse-all-button")
    if collapse.is_enabled():  # a group left open by an earlier visit
        collapse.click()
    expect_hidden = graph.get_by_text("train_challenger", exact=True)
    expect_hidden.wait_for(state="detached")  # inside "model"
    page.wait_for_timeout(1000)  # the fit-view animation
    shot(page, "nightly-graph")
    with timings.flow("expand every group of the graph"):
        page.get_by_test_id("expand-all-button").click()
        graph.get_by_text("train_challenger", exact=True).first.wait_for()
    page.wait_for_timeout(1000)
    shot(page, "nightly-graph-expanded")
