"""What is served is the publish transaction's record, apart from how the run ended.

A stage failing after the swap (retention, the shadow model, the report; an error, Ctrl-C
or a task timeout) fails the run and never un-serves the night. Killed attempts are
marked abandoned and their staging tables dropped, whatever their date. The publish lock
is one only the writer can take.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg2
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.conf.urls import with_role
from pipeline.core.faults import FaultInjected
from pipeline.run import night_report, nightly
from pipeline.stages import publish
from pipeline.store import db, ledger, locks
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
NIGHT = SCORE_DATE + timedelta(days=1)
AFTER_SWAP = ["after_swap", "after_publish", "retention", "score_shadow", "write_report"]


@pytest.fixture(scope="module")
def champion(isolated: Settings) -> dict:
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="served-base")
    return {"version": out["model_version"], "rows": out["published"]["rows"]}


def served(settings: Settings) -> dict:
    return db.scalar(
        settings.database_url,
        "SELECT json_build_object('day', min(s.score_date), 'rows', count(*), 'run', "
        "(SELECT p.run_id FROM ml.publications p WHERE p.use_case = 'churn' "
        "AND p.score_date = min(s.score_date))) FROM predictions.churn_scores_latest s",
    )


def ledger_row(settings: Settings, run_id: str) -> dict:
    return db.scalar(
        settings.database_url,
        "SELECT json_build_object('status', status, 'error', error, 'rows', rows_published) "
        "FROM ml.runs WHERE run_id = %s",
        (run_id,),
    )


@pytest.mark.parametrize("kind", ["error", "interrupt"])
@pytest.mark.parametrize("point", AFTER_SWAP)
def test_a_failure_after_the_swap_fails_the_run_and_never_unserves_the_night(
    isolated: Settings, champion: dict, monkeypatch: pytest.MonkeyPatch, point: str, kind: str
) -> None:
    run_id = f"served-{point}-{kind}"
    monkeypatch.setenv("NIGHTSCORE_FAULT_RAISE", point if kind == "error" else f"{point}:interrupt")
    with pytest.raises(FaultInjected if kind == "error" else KeyboardInterrupt):
        nightly.run_night(isolated, UC, NIGHT, retrain="never", run_id=run_id)
    row = ledger_row(isolated, run_id)
    assert row["status"] == "failed" and f"fault injected at {point}" in row["error"]
    now = served(isolated)
    assert now["day"] == NIGHT.isoformat() and now["run"] == run_id
    assert now["rows"] == row["rows"] > 3000


def test_dead_attempts_are_marked_abandoned_by_the_next_attempt_of_the_date(
    isolated: Settings, champion: dict
) -> None:
    day = SCORE_DATE + timedelta(days=2)
    dead = ledger.RunContext("churn", day, "served-dead")
    ledger.start(isolated, dead)  # then its process "dies": it holds no liveness lock
    live = ledger.RunContext("churn", day, "served-live")
    ledger.start(isolated, live)
    assert ledger_row(isolated, "served-dead")["status"] == "abandoned"
    assert "served-live" in ledger_row(isolated, "served-dead")["error"]
    alive = threading.Event()
    release = threading.Event()

    def working() -> None:  # a live attempt, in the middle of a stage
        with ledger.stage(isolated, live, "build_features"):
            alive.set()
            release.wait(30)

    worker = threading.Thread(target=working)
    worker.start()
    try:
        assert alive.wait(30)
        # a third attempt while the live one works a stage: the live one is left alone
        ledger.start(isolated, ledger.RunContext("churn", day, "served-third"))
        assert ledger_row(isolated, "served-live")["status"] == "running"
    finally:
        release.set()
        worker.join(30)
    summary = ledger.summary_text(isolated, UC, day)
    assert "abandoned" in summary


def test_staging_leftovers_of_any_date_are_dropped_but_not_a_live_one(
    isolated: Settings, champion: dict
) -> None:
    conn = db.connect(isolated.database_url)
    live = "churn_scores_stage_20200102_1ive0000"
    try:
        with conn.cursor() as cur:
            for name in (
                "churn_scores_stage_20200101_deadbeef",
                "churn_scores_shadow_stage_0badf00d",
            ):
                cur.execute(f"CREATE TABLE predictions.{name} (LIKE predictions.churn_scores)")
        conn.commit()
        # a live attempt marks its staging table from before creating it
        with locks.mark(isolated.database_url, publish.STAGE_MARK + live, what="test"):
            db.scalar(isolated.database_url, f"CREATE TABLE predictions.{live} (x int); SELECT 1")
            dropped = publish.drop_leftovers(isolated, UC)
        assert sorted(dropped) == [
            "churn_scores_shadow_stage_0badf00d",
            "churn_scores_stage_20200101_deadbeef",
        ]
    finally:
        db.scalar(
            isolated.database_url,
            "DROP TABLE IF EXISTS predictions.churn_scores_stage_20200102_1ive0000; SELECT 1",
        )
        conn.close()


def test_a_reader_cannot_take_the_publish_lock_nor_hold_up_a_publish(
    isolated: Settings, champion: dict
) -> None:
    db.scalar(
        isolated.database_url,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'served_app') THEN "
        "CREATE ROLE served_app LOGIN IN ROLE nightscore_reader; END IF; END $$; SELECT 1",
    )
    reader = psycopg2.connect(with_role(isolated.init_url, "nightscore_reader"))
    try:
        with reader.cursor() as cur:
            # the old publish lock was an advisory lock on a public key: anyone could hold it
            cur.execute("SELECT pg_advisory_lock(hashtext('nightscore.publish.churn'))")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("SELECT 1 FROM ml.publish_locks WHERE use_case = 'churn' FOR UPDATE")
        reader.rollback()
        began = time.monotonic()
        out = nightly.run_night(
            isolated, UC, SCORE_DATE + timedelta(days=3), retrain="never", run_id="served-lock"
        )
        assert out["published"]["swap_attempts"] == 1 and time.monotonic() - began < 120
    finally:
        reader.close()


def test_the_report_of_a_failed_night_says_why_and_what_stays_served(
    isolated: Settings, champion: dict
) -> None:
    """A night stopped before publishing: its report (written whatever happened, as the
    DAG's ``write_report`` is) names the failed stage and the night readers still get."""
    from pipeline.core.errors import ModelError

    day = SCORE_DATE + timedelta(days=3)
    run = ledger.RunContext("churn", day, "served-failed-night")
    with pytest.raises(ModelError):
        nightly.run_night(
            isolated, UC, day, retrain="never", run_id=run.run_id, rescore_model="nope"
        )
    before = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(p) FROM ml.publications p WHERE use_case = 'churn' "
        "ORDER BY score_date DESC LIMIT 1",
    )
    out = night_report.write_report(isolated, UC, run)
    with open(out["report"]) as fh:
        text = fh.read()
    banner = text[text.index('<div class="banner') : text.index("</div>")]
    assert "banner-failed" in banner and "failed at <code>select_model</code>" in banner
    assert "nope" in banner  # the error: the model that does not exist
    assert "Nothing of this night was published" in banner
    assert f"<strong>{before['score_date']}</strong>" in banner
    assert before["model_version"] in banner
    assert "served model none" not in text
    assert ledger_row(isolated, run.run_id)["status"] == "failed"
