"""Backfills through Airflow 3 itself (``airflow backfill create`` + a real scheduler).

Three dates with a promotion in the middle: each date is scored point-in-time with the
model that was champion on it, the backfill's conf reaches every run it creates, and the
newest published date stays the one served. Each publish updates the ``churn_scores``
asset, so the scheduler also runs ``churn_campaign``: it rebuilds those dates' audiences
and emails nobody (they are past dates).
"""

from __future__ import annotations

import email
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import date, timedelta
from email.message import Message
from pathlib import Path

import httpx
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.paths import REPO_ROOT
from pipeline.run import nightly
from pipeline.stages import train
from pipeline.store import db, registry
from pipeline.synthetic.demo import local_mailbox
from tests.conftest import SCORE_DATE
from tests.dags.services import (
    AIRFLOW,
    airflow_services,
    free_port,
    own_metadata,
    service_env,
    wait_for,
)

UC = usecase.load("churn")
DATES = [SCORE_DATE + timedelta(days=i) for i in range(3)]
PROMOTED_ON = DATES[1]
LATER = SCORE_DATE + timedelta(days=4)
NIGHT = SCORE_DATE - timedelta(days=5)  # a night of its own, running when the backfill starts


@pytest.fixture(scope="module")
def history(isolated: Settings) -> dict[str, str]:
    """Model A is champion from DATES[0]; model B is promoted effective PROMOTED_ON; LATER is served."""
    first = nightly.run_night(isolated, UC, DATES[0], retrain="always", run_id="history-a")
    assert first["evaluation"]["decision"] == "promote"
    # another seed: another model (the same seed and window would give A's bytes, A's name)
    b = train.train_challenger(isolated, UC.evolve({"model": {"seed": 7}}), PROMOTED_ON)
    assert b.version != first["model_version"]
    registry.promote(
        isolated, "churn", b.version, actor="test", reason="reviewed", effective_date=PROMOTED_ON
    )
    nightly.run_night(isolated, UC, LATER, retrain="never", run_id="history-later")
    return {"a": first["model_version"], "b": b.version}


@pytest.fixture
def alerting(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The use cases with churn's deadline one second after a run is queued (every night not
    published within it is late; today's cron night, which has no data, always is), and an
    SMTP sink for the alerts: (the environment, the sink's folder)."""
    cases = tmp_path / "usecases"
    shutil.copytree(REPO_ROOT / "usecases", cases)
    config = cases / "churn" / "usecase.yaml"
    text, changed = re.subn(r"(?m)^  deadline: .*$", "  deadline: 1s", config.read_text())
    assert changed == 1
    config.write_text(text)
    with local_mailbox(tmp_path / "mail") as smtp_env:
        yield smtp_env | {usecase.ENV_USECASES: str(cases)}, tmp_path / "mail"


@pytest.mark.slow
def test_backfill_uses_the_champion_of_each_date_and_passes_conf_to_every_run(
    isolated: Settings,
    history: dict[str, str],
    airflow_env: dict[str, str],
    server_url: str,
    session_id: str,
    tmp_path: Path,
    alerting: tuple[dict[str, str], Path],
) -> None:
    env = service_env(airflow_env, isolated, free_port(), tmp_path) | alerting[0]
    # the scheduler creates asset-triggered runs only with its job schedule on; churn_nightly's
    # own cron run (today, long after the warehouse ends) waits for data, harmlessly
    env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "True"
    conf = {"promotion_mode": "never", "backfill_model": "champion_on_date", "rescore_model": None}
    # a metadata database of its own: no other test's run holds churn_nightly's one active
    # run, and no other test's publish has queued an asset event for churn_campaign
    with own_metadata(env, server_url, f"nightscore_airflow_{session_id}_backfill") as env:
        subprocess.run(
            [AIRFLOW, "dags", "unpause", "churn_campaign"],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        with airflow_services(env, tmp_path, "scheduler") as svc:
            # a night runs (by the scheduler, as a scheduled one would) when the backfill is
            # created; run first (run_after: its own date), ahead of today's cron run, which
            # unpausing queued and which then waits for data that never comes
            triggered = httpx.post(
                f"{svc['base']}/api/v2/dags/churn_nightly/dagRuns",
                headers=svc["headers"],
                json={
                    "logical_date": f"{NIGHT}T00:00:00Z",
                    "run_after": f"{NIGHT}T00:00:00Z",
                    "conf": {"retrain": "never"},
                },
            )
            assert triggered.status_code == 200, triggered.text
            # unpaused only now: the scheduler then queues today's cron run too, and starts
            # the queued run of the earliest run_after (this night) first; unpaused before,
            # the cron run could start (and wait for its data all along) ahead of it
            unpaused = httpx.patch(
                f"{svc['base']}/api/v2/dags/churn_nightly",
                headers=svc["headers"],
                json={"is_paused": False},
            )
            assert unpaused.status_code == 200, unpaused.text

            def holder():
                return db.scalar(
                    isolated.database_url,
                    "SELECT run_id FROM ml.night_turns WHERE use_case = 'churn'",
                )

            night_run = wait_for("the night to take the use case's turn", holder, 600, svc["procs"])
            assert night_run == triggered.json()["dag_run_id"]
            created = subprocess.run(
                [
                    AIRFLOW,
                    "backfill",
                    "create",
                    "--dag-id",
                    "churn_nightly",
                    "--from-date",
                    DATES[0].isoformat(),
                    "--to-date",
                    DATES[-1].isoformat(),
                    "--dag-run-conf",
                    json.dumps(conf),
                    "--max-active-runs",
                    "2",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert created.returncode == 0, created.stdout + created.stderr

            def done():
                rows = (
                    db.scalar(
                        isolated.database_url,
                        "SELECT json_agg(json_build_object('d', score_date, 's', status)) FROM ml.runs "
                        "WHERE run_id LIKE 'backfill__%%'",
                    )
                    or []
                )
                failed = [r for r in rows if r["s"] == "failed"]
                assert not failed, db.scalar(
                    isolated.database_url,
                    "SELECT json_agg(error) FROM ml.runs WHERE status = 'failed'",
                )
                return sum(r["s"] == "published" for r in rows) == len(DATES)

            wait_for("every backfilled date published", done, 900, svc["procs"])
            night_status = db.scalar(
                isolated.database_url,
                "SELECT status FROM ml.runs WHERE run_id = %s",
                (night_run,),
            )
            assert night_status == "published", night_status

            def audiences():
                return db.scalar(
                    isolated.database_url,
                    "SELECT coalesce(array_agg(DISTINCT score_date ORDER BY score_date), '{}') "
                    "FROM campaigns.retention_audience",
                )

            # data-aware scheduling: the publishes' asset events trigger churn_campaign
            built = wait_for(
                "churn_campaign to build the backfilled audiences",
                lambda: (found := audiences()) == [NIGHT, *DATES] and found,
                300,
                svc["procs"],
            )
            # the scheduler found today's night past its deadline; the executor alerted
            today = date.today().isoformat()
            late = wait_for(
                "the alert of today's late night",
                lambda: [m for m in mails(alerting[1]) if today in m["Subject"]],
                300,
                svc["procs"],
            )

    # one night of the use case at a time: the backfill's runs waited for the night that
    # held the turn, and for one another
    spans = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_array(run_id, started_at, finished_at) ORDER BY started_at) "
        "FROM ml.runs WHERE run_id LIKE 'backfill__%%' OR run_id = %s",
        (night_run,),
    )
    assert len(spans) == len(DATES) + 1 and spans[0][0] == night_run
    for (_, _, ended), (later, began, _) in itertools.pairwise(spans):
        assert ended <= began, (later, began, ended)
    assert holder() is None  # every run gave its turn back

    runs = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_object('d', score_date, 'v', model_version, 'p', params, 'st', stages) "
        "ORDER BY score_date) FROM ml.runs WHERE run_id LIKE 'backfill__%%'",
    )
    assert [r["d"] for r in runs] == [d.isoformat() for d in DATES]
    for r in runs:
        expected = history["a"] if r["d"] < PROMOTED_ON.isoformat() else history["b"]
        assert r["v"] == expected, r["d"]
        assert {k: r["p"][k] for k in conf} == conf  # the backfill's conf reached this run
        assert "train_challenger" not in r["st"]  # backfills do not retrain unless asked
    for day in DATES:
        served = db.scalar(
            isolated.database_url,
            "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores WHERE score_date = %s",
            (day,),
        )
        assert served == [history["a"] if day < PROMOTED_ON else history["b"]]
    assert (
        db.scalar(
            isolated.database_url, "SELECT DISTINCT score_date FROM predictions.churn_scores_latest"
        )
        == LATER
    )
    # every published date's audience (the night's too), from the model that scored it
    assert built == [NIGHT, *DATES]
    for day in DATES:
        assert db.scalar(
            isolated.database_url,
            "SELECT array_agg(DISTINCT model_version) FROM campaigns.retention_audience "
            "WHERE score_date = %s",
            (day,),
        ) == [history["a"] if day < PROMOTED_ON else history["b"]]
    assert (
        db.scalar(isolated.database_url, "SELECT count(*) FROM campaigns.retention_send_log") == 0
    )
    assert not (isolated.home / "outbox").exists()  # not even a dry run for past dates

    # one message per late night, each naming the use case, its date, what is served
    # (LATER, by the history) and the run's report; today's night never started its work
    subjects = [m["Subject"] for m in mails(alerting[1])]
    assert len(subjects) == len(set(subjects)), subjects
    assert all(s.startswith("[nightscore] churn: the night of ") for s in subjects), subjects
    (message,) = late
    assert message["Subject"].endswith(f"{today} is not published by its deadline")
    text = message_text(message)
    assert "schedule.deadline 1s after it was queued" in text
    # queued behind the other nights, or waiting for its data: Airflow's state, no ledger row
    assert re.search(r"; it is (queued|running)\.", text) and "never started its work" in text
    assert f"holds the night of {LATER}" in text
    assert "/nightscore/runs/churn_nightly/scheduled__" in text


def mails(folder: Path) -> list[Message]:
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(folder.glob("*.eml"))]


def message_text(message: Message) -> str:
    return "".join(
        part.get_payload(decode=True).decode()
        for part in message.walk()
        if part.get_content_maintype() == "text"
    )
