"""A report per run: each attempt of a date keeps its own, its run's link opens it, the
date's URL shows the newest and the index lists them all."""

from __future__ import annotations

from datetime import timedelta

from pipeline import db, ledger, nightly, report_site, usecase
from pipeline.config import Settings
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
    written = nightly.write_report(isolated, UC, first)
    second = ledger.RunContext("churn", DAY, "manual__report-second")
    ledger.start(isolated, second)
    nightly.write_report(isolated, UC, second)
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
    nightly.write_report(isolated, UC, first)
    assert "manual__report-second" in newest.read_text()

    # each run's link (the Nightly report tab) opens its own report
    for run, n in ((first, one), (second, two)):
        target = report_site.run_target(isolated, ["churn"], "churn_nightly", run.run_id, "nightly")
        assert target == report_site.report_path("churn", DAY, n)
    # the index links the date (newest) and every attempt
    page = report_site.index_html(isolated, ["churn"])
    for n in (None, one, two):
        assert f'href="{report_site.report_path("churn", DAY, n).split("/", 1)[1]}"' in page
