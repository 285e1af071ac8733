"""SIGKILL a whole night at random moments, while readers read: ``nightscore run`` and
Airflow's task process (``airflow dags test``), across every stage of a night with retrain.

After every kill the served night is complete (readers never see a partial or mixed
night); after the converging re-run: one complete night served, every killed attempt
marked abandoned in the ledger, no staging table and no temporary file left behind.

``NIGHTSCORE_KILLS`` sets how many times the CLI is killed (default 6; a quarter as many
Airflow kills follow, at least 2), e.g. ``NIGHTSCORE_KILLS=24`` for 30 kills in all. The
CLI is killed in a stage drawn at random, at a random moment inside it: the test follows
the ledger to the start of the stage and waits a random part of the stage's time in a whole
run, so short stages like the publish are hit as often as training.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.faces import airflow_env as af
from pipeline.run import nightly
from pipeline.store import db, ledger
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
NIGHT = SCORE_DATE + timedelta(days=1)
BIN = Path(sys.executable).parent
EVER = datetime.min.replace(tzinfo=UTC)  # 'started after EVER': any attempt
CLI_KILLS = int(os.environ.get("NIGHTSCORE_KILLS", "6"))
AIRFLOW_KILLS = max(2, CLI_KILLS // 4)
# the stages of a night with retrain and automatic promotion, two score partitions
STAGES = tuple(
    stage
    for name in ledger.NIGHT_STAGES
    # approval-mode tasks; automatic promotion happens inside evaluate_challenger
    if name not in ("promote_challenger", "record_review")
    for stage in (
        ("score_partition_0", "score_partition_1") if name == "score_partition" else (name,)
    )
)

SERVED = """
SELECT count(*), count(DISTINCT s.model_version), min(s.score_date),
       (SELECT p.rows FROM ml.publications p WHERE p.use_case = 'churn'
        AND p.score_date = (SELECT max(score_date) FROM ml.publications WHERE use_case = 'churn'))
FROM predictions.churn_scores_latest s
"""


class Readers(threading.Thread):
    """Reads the served night in a loop; every read must be one complete night."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.reads, self.bad = url, threading.Event(), 0, []

    def run(self) -> None:
        conn = db.connect(self.url, autocommit=True)
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute(SERVED)
                    rows, versions, day, published = cur.fetchone()
                    self.reads += 1
                    if rows != published or versions != 1:
                        self.bad.append((rows, published, versions, str(day)))
                    time.sleep(0.02)
        finally:
            conn.close()


def newest_stages(settings: Settings, since: object) -> dict[str, object]:
    """The stages recorded so far by the attempt of the night started (or restarted, as a
    retried Airflow run is) after ``since``."""
    stages = db.scalar(
        settings.database_url,
        "SELECT stages FROM ml.runs WHERE use_case = 'churn' AND score_date = %s "
        "AND started_at > %s ORDER BY started_at DESC LIMIT 1",
        (NIGHT, since),
    )
    return stages or {}


def kill_in(
    args: list[str], env: dict[str, str], settings: Settings, stage: str, within: float
) -> bool:
    """Start ``args``, wait until the ledger shows ``stage`` has begun (the stage before it
    is recorded), then SIGKILL the whole process group ``within`` seconds into it; False if
    the process finished first. Following the ledger rather than the clock keeps the kill
    inside the drawn stage however fast or loaded the machine is."""
    since = db.scalar(settings.database_url, "SELECT now()")
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
    while before is not None and proc.poll() is None:
        if before in newest_stages(settings, since):
            break
        time.sleep(0.01)
    time.sleep(within)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    return killed


def reached(settings: Settings) -> str:
    """The last stage the newest attempt of the night recorded ('-' before the ledger), or
    'published' when it was killed after its publish committed (the swap marks the run
    published before the stage is recorded): such a run is rightly not abandoned."""
    status = db.scalar(
        settings.database_url,
        "SELECT status FROM ml.runs WHERE use_case = 'churn' AND score_date = %s "
        "ORDER BY started_at DESC LIMIT 1",
        (NIGHT,),
    )
    if status == "published":
        return "published"
    done = [s for s in STAGES if s in newest_stages(settings, EVER)]
    return done[-1] if done else "-"


def timed(args: list[str], env: dict[str, str]) -> float:
    began = time.monotonic()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if args[0].endswith("nightscore"):
        assert_stage_lines(result.stderr)
        json.loads(result.stdout)  # the progress is on stderr: stdout is still the JSON
    return time.monotonic() - began


def assert_stage_lines(stderr: str) -> None:
    """``nightscore run`` shows each stage of the night starting and ending with its time."""
    lines = stderr.splitlines()
    shown = [s for s in STAGES if not s.startswith("score_partition_")] + ["score_partitions"]
    for stage in shown:
        assert f"▸ {stage} …" in lines, stderr
        assert any(
            re.fullmatch(rf"✓ {stage}  [\d.]+ s|✓ {stage}  \d+ min \d\d s", line) for line in lines
        ), stderr
    assert re.search(r"^published [\d,]+ rows for \S+ with \S+ in ", stderr, re.M), stderr


def stage_spans(settings: Settings, whole: float) -> dict[str, float]:
    """Seconds each stage of the newest published run took; ``start_run`` also counts the
    process start-up (imports and connections) before the ledger has a row."""
    stages = db.scalar(
        settings.database_url,
        "SELECT stages FROM ml.runs WHERE use_case = 'churn' AND score_date = %s "
        "AND status = 'published' ORDER BY started_at DESC LIMIT 1",
        (NIGHT,),
    )
    spans = {s: max(float(stages[s].get("seconds", 0.05)), 0.05) for s in STAGES if s in stages}
    spans[STAGES[0]] = max(0.2, whole - sum(spans.values()))
    return spans


def leftovers(settings: Settings) -> dict[str, object]:
    staging = db.scalar(
        settings.database_url,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'predictions' "
        "AND tablename LIKE '%%\\_stage\\_%%'",
    )
    detached = db.scalar(
        settings.database_url,
        """SELECT count(*) FROM pg_tables t WHERE schemaname = 'predictions'
           AND tablename LIKE 'churn\\_scores\\_p%%'
           AND NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                           WHERE c.relname = t.tablename)""",
    )
    temps = sorted(str(p) for p in settings.home.rglob(".*.tmp"))
    return {"staging": staging, "detached": detached, "temps": temps}


@pytest.mark.slow
def test_killing_whole_runs_at_random_moments_leaves_one_complete_night(
    isolated: Settings, airflow_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="kills-base")
    env = os.environ | {
        "NIGHTSCORE_DATABASE_URL": isolated.database_url,
        "NIGHTSCORE_HOME": str(isolated.home),
        "NIGHTSCORE_DB_ROLE": "",
    }
    cli = [str(BIN / "nightscore"), "run", "--use-case", "churn", "--date", NIGHT.isoformat(),
           "--retrain", "always"]  # fmt: skip
    flow = (
        airflow_env
        | af.airflow_env(isolated)
        | {
            "NIGHTSCORE_DATABASE_URL": isolated.database_url,
            "NIGHTSCORE_WAREHOUSE_URL": isolated.warehouse_url,
        }
    )
    dags_test = [str(BIN / "airflow"), "dags", "test", "churn_nightly", NIGHT.isoformat(),
                 "--conf", json.dumps({"retrain": "always"})]  # fmt: skip
    rng = random.Random(20241121)
    readers = Readers(isolated.database_url)
    readers.start()
    killed_at: Counter[str] = Counter()
    try:
        spans = stage_spans(isolated, timed(cli, env))
        for _ in range(CLI_KILLS):
            stage = rng.choice(list(spans))
            if kill_in(cli, env, isolated, stage, rng.uniform(0, spans[stage])):
                killed_at["cli after " + reached(isolated)] += 1
            assert leftovers(isolated)["detached"] == 0
        timed(dags_test, flow)
        for _ in range(AIRFLOW_KILLS):
            stage = rng.choice(list(spans)[1:])  # the task process starts before the ledger
            if kill_in(dags_test, flow, isolated, stage, rng.uniform(0, spans[stage])):
                killed_at["airflow after " + reached(isolated)] += 1
            assert leftovers(isolated)["detached"] == 0
        timed(cli, env)  # the converging re-run
        time.sleep(0.5)
    finally:
        readers.stop.set()
        readers.join(30)
    with capsys.disabled():
        print(f"\n{sum(killed_at.values())} kills, {readers.reads} reads: {dict(killed_at)}")
    assert sum(killed_at.values()) >= (CLI_KILLS + AIRFLOW_KILLS) * 0.8
    assert readers.reads > 100 and readers.bad == []
    rows, versions, day, published = db.scalar(
        isolated.database_url,
        f"SELECT json_build_array(c, v, d, p) FROM ({SERVED}) AS q(c, v, d, p)",
    )
    assert day == NIGHT.isoformat() and rows == published > 3000 and versions == 1
    statuses = db.scalar(
        isolated.database_url,
        "SELECT json_object_agg(status, n) FROM (SELECT status, count(*) AS n FROM ml.runs "
        "WHERE use_case = 'churn' AND score_date = %s GROUP BY status) s",
        (NIGHT,),
    )
    # every killed attempt that had started is abandoned; none is left running. The CLI
    # starts a new run each time; Airflow retries its one run, whose ledger row restarts.
    assert set(statuses) <= {"published", "abandoned", "failed"}, statuses
    unfinished = [k for k in killed_at if not k.endswith((" -", " published"))]
    killed_runs = sum(killed_at[k] for k in unfinished if k.startswith("cli"))
    killed_runs += any(k.startswith("airflow") for k in unfinished)
    assert statuses.get("abandoned", 0) >= killed_runs, (statuses, killed_at)
    assert leftovers(isolated) == {"staging": 0, "detached": 0, "temps": []}
