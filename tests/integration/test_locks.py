"""The pipeline's locks are ones only the writer can take, with a timeout naming the holder;
an attempt whose process is gone is abandoned by any later run of its use case.

A session of an application (a login in ``nightscore_reader``) holding the advisory locks
the pipeline once used cannot make a night, a promotion or a publish wait, and cannot lock
the rows the pipeline locks now. Two writers contending for a lock: the waiter fails after
the lock timeout with an error naming the session that holds it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import LockTimeout
from pipeline.faces import cli
from pipeline.run import nightly
from pipeline.stages import publish
from pipeline.store import db, ledger, locks, registry
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
READER_LOGIN = "locks_reader_app"
WAIT = 240  # seconds a night may take here; a night waiting on a reader would never end


@pytest.fixture(scope="module")
def champion(isolated: Settings) -> str:
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="locks-base")
    return str(out["model_version"])


@pytest.fixture
def reader(isolated: Settings) -> Iterator[Any]:
    """A session of an application's login role, a member of nightscore_reader only."""
    db.scalar(
        isolated.init_url,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
        f"'{READER_LOGIN}') THEN CREATE ROLE {READER_LOGIN} LOGIN IN ROLE nightscore_reader; "
        "END IF; END $$; SELECT 1",
    )
    parts = urlsplit(isolated.init_url)
    netloc = READER_LOGIN + "@" + parts.netloc.rsplit("@", 1)[-1]
    conn = psycopg2.connect(
        urlunsplit(parts._replace(netloc=netloc)), application_name="locks-test-reader"
    )
    conn.autocommit = True
    yield conn
    conn.close()


def within(seconds: float, fn: Callable[[], Any], reader: Any) -> Any:
    """``fn()``, which must end within ``seconds``; if it does not, the reader's session is
    closed (releasing whatever it holds) so that the test fails instead of hanging."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        reader.close()
        worker.join(120)
        pytest.fail(f"still waiting after {seconds}s while a reader held its locks")
    if errors:
        raise errors[0]
    return out[0]


def status(settings: Settings, run_id: str) -> dict:
    return db.scalar(
        settings.database_url,
        "SELECT json_build_object('status', status, 'error', error) FROM ml.runs WHERE run_id = %s",
        (run_id,),
    )


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1 FROM ml.locks FOR UPDATE",
        "SELECT 1 FROM ml.locks FOR KEY SHARE",
        "SELECT 1 FROM ml.runs FOR KEY SHARE",
        "SELECT 1 FROM ml.publish_locks FOR UPDATE",
        "INSERT INTO ml.locks (key) VALUES ('ledger.churn')",
    ],
)
def test_a_reader_cannot_take_the_pipelines_locks(
    isolated: Settings, reader: Any, statement: str
) -> None:
    with reader.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute(statement)


def test_a_reader_holding_every_old_advisory_key_makes_nothing_wait(
    isolated: Settings, champion: str, reader: Any
) -> None:
    night = SCORE_DATE + timedelta(days=1)
    run_id = "locks-reader-night"
    leftover = "churn_scores_stage_20200103_0dead000"  # a killed attempt's staging table
    db.scalar(
        isolated.database_url,
        f"CREATE TABLE predictions.{leftover} (LIKE predictions.churn_scores); SELECT 1",
    )
    with reader.cursor() as cur:
        for key in (
            f"nightscore.ledger.churn.{night}",
            "nightscore.registry.churn",
            f"nightscore.run.{run_id}",
            f"nightscore.stage.{leftover}",
            "nightscore.publish.churn",
        ):
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
    out = within(
        WAIT,
        lambda: nightly.run_night(isolated, UC, night, retrain="never", run_id=run_id),
        reader,
    )
    assert out["published"]["swap_attempts"] == 1
    assert status(isolated, run_id)["status"] == "published"
    assert (
        db.scalar(isolated.database_url, "SELECT to_regclass(%s)", (f"predictions.{leftover}",))
        is None
    )
    previous = within(
        60,
        lambda: registry.promote(
            isolated, "churn", champion, actor="test", reason="lock test", effective_date=night
        ),
        reader,
    )
    assert previous == champion  # already the champion: nothing changed, nothing waited
    within(60, lambda: registry.set_shadow(isolated, "churn", champion), reader)


@pytest.mark.parametrize("operation", ["ledger start", "promotion", "shadow", "lock"])
def test_a_writer_waiting_past_the_lock_timeout_is_told_which_session_holds_it(
    isolated: Settings, champion: str, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    monkeypatch.setattr(locks, "LOCK_TIMEOUT", "300ms")
    key = {"ledger start": "ledger.churn", "lock": "test.lock"}.get(operation, "registry.churn")
    calls: dict[str, Callable[[], Any]] = {
        "ledger start": lambda: ledger.start(
            isolated, ledger.RunContext("churn", SCORE_DATE - timedelta(days=40), "locks-wait")
        ),
        "promotion": lambda: registry.promote(
            isolated, "churn", champion, actor="test", reason="t", effective_date=SCORE_DATE
        ),
        "shadow": lambda: registry.set_shadow(isolated, "churn", champion),
        "lock": lambda: waiter_lock(isolated, key),
    }
    holder = db.connect(isolated.database_url, application_name="locks-test-holder")
    try:
        with holder.cursor() as cur:
            locks.lock(cur, key, what="the test's long transaction")
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        began = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            calls[operation]()
        waited = time.monotonic() - began
    finally:
        holder.close()
    message = str(caught.value)
    assert 0.3 <= waited < 10, waited
    assert f"pid {pid} " in message and "'locks-test-holder'" in message, message
    assert repr(key) in message and "300ms" in message and "pg_terminate_backend" in message
    # the holder gone, the same operation goes through at once
    calls[operation]()


def waiter_lock(settings: Settings, key: str) -> None:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            try:
                locks.lock(cur, key, what="the test's second transaction")
            finally:
                cur.execute("SELECT 1")  # the transaction was rolled back: the session works
        conn.commit()
    finally:
        conn.close()


def working_in_a_stage(settings: Settings, run: ledger.RunContext) -> subprocess.Popen:
    """A process that starts ``run`` and works on a stage of it (holding the run's liveness
    mark) until killed."""
    code = (
        "import sys, time; from datetime import date; from pathlib import Path\n"
        "from pipeline.store import ledger; from pipeline.conf.config import Settings\n"
        "s = Settings(database_url=sys.argv[1], warehouse_url=sys.argv[1], home=Path(sys.argv[2]))\n"
        "run = ledger.RunContext('churn', date.fromisoformat(sys.argv[3]), sys.argv[4])\n"
        "ledger.start(s, run)\n"
        "with ledger.stage(s, run, 'build_features'):\n"
        "    print('working', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            settings.database_url,
            str(settings.home),
            run.score_date.isoformat(),
            run.run_id,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "working"
    return proc


def test_attempts_whose_process_is_gone_are_abandoned_by_any_later_run_of_the_use_case(
    isolated: Settings, champion: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    killed = ledger.RunContext("churn", SCORE_DATE - timedelta(days=30), "locks-killed")
    never_staged = ledger.RunContext("churn", SCORE_DATE - timedelta(days=31), "locks-gone")
    live = ledger.RunContext("churn", SCORE_DATE - timedelta(days=32), "locks-live")
    victim = working_in_a_stage(isolated, killed)
    worker = working_in_a_stage(isolated, live)
    ledger.start(isolated, never_staged)  # its process died before its first stage
    try:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
        time.sleep(0.5)  # the server notices its client is gone
        later = "locks-later"
        nightly.run_night(
            isolated, UC, SCORE_DATE + timedelta(days=2), retrain="never", run_id=later
        )
        for gone in (killed, never_staged):
            row = status(isolated, gone.run_id)
            assert row["status"] == "abandoned" and later in row["error"], row
        assert status(isolated, live.run_id)["status"] == "running"  # its process works on
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
    time.sleep(0.5)
    # an attempt abandoned while none of its processes worked runs again once one does
    with ledger.stage(isolated, never_staged, "check_sources"):
        assert status(isolated, never_staged.run_id)["status"] == "running"
    # its process gone too, the next run of the use case abandons it, as it does the
    # attempts whose process is gone (and, stopped, leaves nothing running)
    following = ledger.RunContext("churn", SCORE_DATE - timedelta(days=33), "locks-following")
    ledger.start(isolated, following)
    ledger.update(isolated, following, status="stopped")
    for gone in (live, never_staged):
        assert status(isolated, gone.run_id)["status"] == "abandoned"
    monkeypatch.setenv("NIGHTSCORE_DATABASE_URL", isolated.database_url)
    monkeypatch.setenv("NIGHTSCORE_HOME", str(isolated.home))
    capsys.readouterr()
    assert cli.main(["--quiet", "summary", "--use-case", "churn"]) == 0
    shown = re.findall(r"^(\d{4}-\d\d-\d\d)  (\S+)", capsys.readouterr().out, re.M)
    statuses = dict(shown)
    assert statuses[str(killed.score_date)] == "abandoned"
    assert statuses[str(live.score_date)] == "abandoned"
    assert "running" not in {s for _, s in shown}, shown


def test_a_staging_table_is_kept_while_its_publish_marks_it_and_dropped_once_not(
    isolated: Settings,
) -> None:
    name = "churn_scores_stage_20200104_11ve0001"
    with locks.mark(isolated.database_url, publish.STAGE_MARK + name, what="test"):
        db.scalar(isolated.database_url, f"CREATE TABLE predictions.{name} (x int); SELECT 1")
        assert publish.drop_leftovers(isolated, UC) == []
    assert publish.drop_leftovers(isolated, UC) == [name]
    assert (
        db.scalar(isolated.database_url, "SELECT count(*) FROM ml.locks WHERE key LIKE 'stage.%%'")
        == 0
    )
