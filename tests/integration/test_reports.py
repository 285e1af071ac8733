"""A report per run: each attempt of a date keeps its own, its run's link opens it, the
date's URL shows the newest and the index lists them all."""

from __future__ import annotations

from datetime import timedelta

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.reports import report_site
from pipeline.run import night_report
from pipeline.store import db, ledger
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
DAY = SCORE_DATE + timedelta(days=11)


def _attempt(settings: Settings, run: ledger.RunContext) -> int:
    return db.scalar(
        settings.database_url, "SELECT attempt FROM ml.runs WHERE run_id = %s", (run.run_id,)
    )


def test_each_attempt_keeps_its_report_and_the_date_shows_the_newest(isolated: Settings) -> None:
    first = ledger.RunContext("churn", DAY, "manual__report-first")
    ledger.start(isolated, first)
    ledger.update(isolated, first, status="failed", error="check_sources: a check failed")
    written = night_report.write_report(isolated, UC, first)
    second = ledger.RunContext("churn", DAY, "manual__report-second")
    ledger.start(isolated, second)
    night_report.write_report(isolated, UC, second)
    one, two = _attempt(isolated, first), _attempt(isolated, second)
    assert two == one + 1

    own = {n: report_site.night_file(isolated, "churn", DAY, n) for n in (one, two)}
    assert written["report"] == str(own[one])
    assert "manual__report-first" in own[one].read_text()
    assert "check_sources: a check failed" in own[one].read_text()
    assert "manual__report-second" in own[two].read_text()
    newest = report_site.night_file(isolated, "churn", DAY)
    assert newest.read_bytes() == own[two].read_bytes()
    # the first attempt's report written again later: the date still shows the newest
    night_report.write_report(isolated, UC, first)
    assert "manual__report-second" in newest.read_text()

    # each run's link (the Nightly report tab) opens its own report
    for run, n in ((first, one), (second, two)):
        target = report_site.run_target(isolated, ["churn"], "churn_nightly", run.run_id, "nightly")
        assert target == report_site.report_path("churn", DAY, n)
    # the index links the date (newest) and every attempt
    page = report_site.index_html(isolated, ["churn"])
    for n in (None, one, two):
        assert f'href="{report_site.report_path("churn", DAY, n).split("/", 1)[1]}"' in page


def test_a_run_without_its_report_shows_what_it_waits_for(isolated: Settings) -> None:
    """The run's tab (the app's /runs/<dag>/<run>) of a run with no report of its own: its
    state and the run it waits behind, never another run's report or raw JSON."""
    from fastapi.testclient import TestClient

    from pipeline.reports import report_app
    from pipeline.reports.run_status import RunStatus
    from pipeline.store import turns

    holder = "manual__report-holder"
    assert turns.take(isolated, "churn", holder, alive=lambda run_id: True) is None
    third = ledger.RunContext("churn", DAY, "manual__report-third")
    ledger.start(isolated, third)  # running: its report is not written yet
    known = {
        "manual__queued": RunStatus(
            "churn_nightly",
            "manual__queued",
            "queued",
            max_active_runs=1,
            running=((holder, None),),
        ),
        "manual__turn": RunStatus(
            "churn_nightly", "manual__turn", "running", waiting_at=("wait_for_turn",)
        ),
        third.run_id: RunStatus("churn_nightly", third.run_id, "running"),
    }
    client = TestClient(
        report_app.create_app(
            lambda: isolated, lambda: [UC], runs=lambda dag_id, run_id: known.get(run_id)
        )
    )
    try:
        queued = client.get("/runs/churn_nightly/manual__queued")
        assert queued.status_code == 200 and queued.headers["content-type"].startswith("text/html")
        assert "This run is <strong>queued</strong>" in queued.text
        assert f'waits behind <a href="{holder}"><code>{holder}</code></a>' in queued.text
        turn = client.get("/runs/churn_nightly/manual__turn")
        assert "<code>wait_for_turn</code> behind" in turn.text and holder in turn.text
        assert "holds the use case's turn since" in turn.text  # read from ml.night_turns
        # a live night in the ledger: not the date's newest report (another run's)
        live = client.get(f"/runs/churn_nightly/{third.run_id}", follow_redirects=False)
        assert live.status_code == 200 and "has no report of its own yet" in live.text
        # a run Airflow does not know: the not-found page as before
        missing = client.get("/runs/churn_nightly/manual__nobody")
        assert missing.status_code == 404 and "not in the ledger" in missing.text
    finally:
        turns.give_back(isolated, "churn", holder)
