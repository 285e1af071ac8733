"""Kill the publisher (SIGKILL) or its backend (pg_terminate_backend) at every step, repeatedly.

After each fault: the latest view returns exactly one complete run, row counts match the
ledger, no partition is left detached, and a re-run converges and cleans up leftovers.
"""

from __future__ import annotations

import time

import pytest

from pipeline.conf.config import Settings
from pipeline.store import db
from tests.conftest import SCORE_DATE
from tests.faults.conftest import Publisher


def consistent(settings: Settings, rows: int) -> None:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(DISTINCT model_version), min(score_date) FROM predictions.churn_scores_latest"
            )
            served, versions, day = cur.fetchone()
            cur.execute(
                "SELECT rows_published FROM ml.runs WHERE use_case = 'churn' AND status = 'published' "
                "AND score_date = %s ORDER BY finished_at DESC LIMIT 1",
                (day,),
            )
            ledger_rows = cur.fetchone()[0]
            cur.execute(
                """SELECT count(*) FROM pg_tables t WHERE schemaname = 'predictions'
                   AND tablename LIKE 'churn\\_scores\\_p%%'
                   AND NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                                   WHERE c.relname = t.tablename)"""
            )
            detached = cur.fetchone()[0]
    finally:
        conn.close()
    assert served == rows == ledger_rows, (served, rows, ledger_rows)
    assert versions == 1 and day == SCORE_DATE
    assert detached == 0


def leftovers(settings: Settings) -> int:
    return db.scalar(
        settings.database_url,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'predictions' AND tablename LIKE '%%\\_stage\\_%%'",
    )


def rerun_converges(publisher: Publisher, settings: Settings, rows: int) -> None:
    proc, run_id = publisher.start(None)
    assert proc.wait(120) == 0, proc.stdout.read()
    consistent(settings, rows)
    assert leftovers(settings) == 0
    status = db.scalar(
        settings.database_url, "SELECT status FROM ml.runs WHERE run_id = %s", (run_id,)
    )
    assert status == "published"


@pytest.mark.parametrize("point", ["during_copy", "after_validation", "inside_swap", "after_swap"])
def test_sigkill_at_each_step_leaves_one_complete_run(
    isolated: Settings, night: dict, publisher: Publisher, point: str
) -> None:
    for _ in range(2):
        proc, _run = publisher.start(point)
        Publisher.kill(proc)
        time.sleep(0.3)  # the backend notices its client is gone
        consistent(isolated, night["rows"])
        rerun_converges(publisher, isolated, night["rows"])


@pytest.mark.parametrize(
    ("point", "backend_query"),
    [
        ("during_copy", "query ILIKE 'COPY%%'"),
        ("inside_swap", "state = 'idle in transaction'"),
    ],
)
def test_backend_terminated_mid_copy_and_mid_swap(
    isolated: Settings, night: dict, publisher: Publisher, point: str, backend_query: str
) -> None:
    for _ in range(2):
        proc, _run = publisher.start(point, pause_seconds=3)
        terminated = db.scalar(
            isolated.database_url,
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() AND {backend_query}",
        )
        assert terminated >= 1
        assert proc.wait(120) != 0  # the publish failed loudly
        consistent(isolated, night["rows"])
        rerun_converges(publisher, isolated, night["rows"])
