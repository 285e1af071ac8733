"""Airflow listener plugin: a run's note says what a person decided in it.

When a nightscore task records an approval or a rejection (``record_review``,
``record_policy_review``), it leaves the sentence in an XCom with the key ``dag_run_note``
("Rejected by admin at 2026-12-06 09:04 UTC; churn-... kept as shadow"). When the run
ends, this listener appends that sentence to the run's note, which the Airflow UI shows on
the run. Listeners run where a run's state changes: the scheduler, ``airflow dags test``
and the API server (a run marked by hand); the note is written in the transaction that
changes the state (or, under ``dags test``, where the run object is detached, in a short
one of its own). A failure here is logged by Airflow and never changes the run's state.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, ClassVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)
NOTE_KEY = "dag_run_note"


def _note_text(dag_run: Any, session: Any) -> str | None:
    from airflow.models.xcom import XComModel

    rows = session.scalars(
        XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key=NOTE_KEY)
    ).all()
    texts = [str(XComModel.deserialize_value(row)) for row in rows]
    return "\n".join(t for t in texts if t) or None


def _apply(dag_run: Any, session: Any) -> None:
    text = _note_text(dag_run, session)
    if not text:
        return
    old = dag_run.note or ""
    if text in old:
        return
    dag_run.note = f"{old}\n{text}" if old else text
    log.info("note of %s %s: %s", dag_run.dag_id, dag_run.run_id, text)


def _set_note(dag_run: Any) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:  # the scheduler's or the request's transaction commits it
        _apply(dag_run, session)
        return
    with create_session(scoped=False) as own:  # `airflow dags test`: the run is detached
        _apply(own.get(DagRun, dag_run.id), own)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _set_note(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _set_note(dag_run)


class NightscoreRunNotesPlugin(AirflowPlugin):
    name = "nightscore_run_notes"
    listeners: ClassVar[list[Any]] = [
        sys.modules[__name__]
    ]  # this module holds the hook implementations
