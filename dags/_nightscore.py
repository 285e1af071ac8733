"""Airflow glue shared by the nightscore DAGs: connections to settings, run context.

Imported only inside task bodies, so parsing a DAG opens no connection and reads no
Variable. Kept out of DAG parsing by ``.airflowignore``.
"""

from __future__ import annotations

from datetime import date
from typing import Any

CONN_DB = "nightscore_db"


def _conn_url(conn_id: str | None) -> str | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from pipeline.conf.urls import url_from_parts

    if not conn_id:
        return None
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return url_from_parts(conn.host, conn.port, conn.login, conn.password, conn.schema)


def settings(uc: Any, *, require_serving: bool = False) -> Any:
    """Settings for a use case: the serving database from ``nightscore_db``, the warehouse
    from the use case's own connection (each falling back to env vars / embedded server).

    ``require_serving`` refuses (naming ``nightscore db init``) when the use case's serving
    objects do not exist yet.
    """
    from pipeline.conf.config import load_settings, private_by_default
    from pipeline.store import serving

    private_by_default()
    resolved = load_settings(
        database_url=_conn_url(CONN_DB),
        warehouse_url=_conn_url(uc.warehouse.connection),
        uc=uc,
    )
    if require_serving:
        serving.require(resolved, uc)
    return resolved


def score_date(context: dict[str, Any], timezone: str = "UTC") -> date:
    """The as-of date of this run: the end of its data interval (facts strictly before it),
    as a date in the use case's schedule timezone."""
    for key in ("data_interval_end", "logical_date"):
        value = context.get(key)
        if value is not None:
            return _local_date(value, timezone)
    run_after = context["run_after"] if "run_after" in context else context["dag_run"].run_after
    return _local_date(run_after, timezone)


def _local_date(moment: Any, timezone: str) -> date:
    from zoneinfo import ZoneInfo

    if getattr(moment, "tzinfo", None) is None:
        return moment.date()
    return moment.astimezone(ZoneInfo(timezone)).date()


def run_context(context: dict[str, Any], uc: Any) -> Any:
    from pipeline.store.ledger import RunContext

    return RunContext(uc.name, score_date(context, uc.schedule.timezone), context["dag_run"].run_id)


def is_backfill(context: dict[str, Any] | None = None) -> bool:
    from airflow.sdk import get_current_context

    run_type = getattr((context or get_current_context())["dag_run"], "run_type", "")
    return str(getattr(run_type, "value", run_type)) == "backfill"


def review_answer(task_id: str) -> dict[str, Any]:
    """The answer to the approval ``task_id`` of this run (chosen options, who, when), as
    ``ReviewedApproval`` left it; skips the calling task when no approval was asked."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowSkipException

    answer = get_current_context()["ti"].xcom_pull(task_ids=task_id, key="hitl_response")
    if not answer:
        raise AirflowSkipException(f"{task_id} asked nobody in this run: nothing to record")
    return dict(answer)


def approver(task_id: str) -> str:
    """Who answered the approval ``task_id`` of this run ("unknown" if nobody did)."""
    answer = review_answer(task_id)
    return str((answer.get("responded_by_user") or {}).get("name") or "unknown")


NOTE_KEY = "dag_run_note"  # read by plugins/nightscore_run_notes.py when the run ends


def leave_note(text: str) -> None:
    """Leave a sentence for the run's note (appended when the run ends)."""
    from airflow.sdk import get_current_context

    get_current_context()["ti"].xcom_push(key=NOTE_KEY, value=text)


def record_run_page(settings: Any, name: str, kind: str, days: list[Any]) -> None:
    """Record the dates this campaign or monitoring run handled: its report tab opens the
    page of the newest (``pipeline.reports.run_pages``)."""
    from airflow.sdk import get_current_context

    from pipeline.reports import run_pages
    from pipeline.store import db

    run = get_current_context()["dag_run"]
    run_pages.record(settings, run.dag_id, run.run_id, name, kind, [db.to_date(d) for d in days])


def use_case_context(name: str) -> tuple[Any, Any, date]:
    """(settings, use case, score date) of the current task's run."""
    from airflow.sdk import get_current_context

    from pipeline.conf import usecase

    uc = usecase.load(name)
    ready = settings(uc, require_serving=True)
    return ready, uc, score_date(get_current_context(), uc.schedule.timezone)


def nightly_stage(stage: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """The body of a nightly task: ``pipeline.run.nightly.stage(stage)(settings, use case, run, ...)``.

    Bad data, bad config or a gate saying no (``DataError``, ``ConfigError``,
    ``GateFailed``) fails the task at once: a retry would read the same data and config
    and give the same answer, so only other errors (a dropped connection, a full disk) go
    through the task's retries.
    """
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.conf import usecase
    from pipeline.core.errors import ConfigError, DataError, GateFailed
    from pipeline.run import nightly

    try:
        uc = usecase.load(name)
        run = run_context(get_current_context(), uc)
        return nightly.stage(stage)(settings(uc), uc, run, *args, **kwargs)
    except (DataError, GateFailed, ConfigError) as err:
        raise AirflowFailException(str(err)) from err


def data_landed(name: str) -> bool:
    """The poke of ``wait_for_data``: has the night's data landed?

    A night of today (or later) waits for the use case's ``fresh`` tables to reach the
    day before; a past night (a backfill, a re-run) does not wait: data missing by now is
    not coming, and ``check_sources`` says precisely what is missing.
    """
    import logging

    from airflow.sdk import get_current_context

    from pipeline.conf import usecase
    from pipeline.conf.config import today_in
    from pipeline.run import nightly

    log = logging.getLogger("nightscore.wait_for_data")
    uc = usecase.load(name)
    day = score_date(get_current_context(), uc.schedule.timezone)
    if day < today_in(uc.schedule.timezone):
        log.info("the night of %s is in the past: not waiting (check_sources checks it)", day)
        return True
    waiting = nightly.waiting_for_data(settings(uc), uc, day)
    for line in waiting:
        log.warning(
            "the night of %s waits for %s; checking every %g min, skipping the night after %g h",
            day,
            line,
            uc.schedule.data_poke_minutes,
            uc.schedule.data_wait_hours,
        )
    return not waiting


CONN_SMTP = "nightscore_smtp"


def smtp_target() -> Any:
    """The SMTP server of the ``nightscore_smtp`` connection (None when it is not defined).

    Extra fields: ``starttls`` / ``ssl`` (booleans), ``from`` (the sender), ``timeout``.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from pipeline.campaigns.sending import DEFAULT_SENDER, SmtpTarget

    try:
        conn = BaseHook.get_connection(CONN_SMTP)
    except AirflowNotFoundException:
        return None
    extra = conn.extra_dejson or {}

    def flag(name: str) -> bool:  # JSON booleans, or strings from a URI's query
        return str(extra.get(name, False)).lower() in ("1", "true", "yes", "on")

    return SmtpTarget(
        host=conn.host or "localhost",
        port=int(conn.port or 25),
        login=conn.login or None,
        password=conn.password or None,
        starttls=flag("starttls"),
        ssl=flag("ssl"),
        sender=str(extra.get("from", DEFAULT_SENDER)),
        timeout=float(extra.get("timeout", 30)),
    )


def published_dates(context: dict[str, Any]) -> list[str]:
    """Score dates announced by the asset events that triggered this run (real publishes only)."""
    dates = []
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            extra = getattr(event, "extra", None) or {}
            if extra.get("score_date") and extra.get("published", True):
                dates.append(str(extra["score_date"]))
    return sorted(set(dates))


def take_turn(name: str) -> bool:
    """The poke of ``wait_for_turn``: take the use case's turn for this run (True), or say
    which run holds it and wait (False). A holder Airflow no longer runs loses it."""
    import logging

    from airflow.sdk import get_current_context

    from pipeline.conf import usecase
    from pipeline.store import turns

    context = get_current_context()
    run, ti = context["dag_run"], context["ti"]

    def alive(run_id: str) -> bool:
        try:
            state = ti.get_dagrun_state(run.dag_id, run_id)
        except Exception:  # not a run of this DAG (any more): nobody to wait for
            return False
        return str(getattr(state, "value", state)) in ("queued", "running")

    why = turns.take(settings(usecase.load(name)), name, run.run_id, alive)
    if why:
        logging.getLogger("nightscore.wait_for_turn").info("%s", why)
    return why is None


def give_turn_back(name: str) -> None:
    """Give the use case's turn back once this run's report is written (or skipped)."""
    from airflow.sdk import get_current_context

    from pipeline.conf import usecase
    from pipeline.store import turns

    run_id = get_current_context()["dag_run"].run_id
    turns.give_back(settings(usecase.load(name)), name, run_id)


def _report_url(dag_id: str, run_id: str) -> str:
    """The run's report, absolute when ``[api] base_url`` is set."""
    from airflow.sdk.configuration import conf

    from pipeline.reports import report_site

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    return f"{base}/{report_site.run_path(dag_id, run_id)}"


def alert_failed(use_case: str, context: dict[str, Any]) -> None:
    """The nightly DAG's failure callback: tell the use case's alert notifier which stage
    failed and why (``pipeline.run.alerts``). Run by the DAG processor (``dags test`` too)."""
    from pipeline.conf import usecase
    from pipeline.run import alerts

    uc = usecase.load(use_case)
    run = context["dag_run"]
    alert = alerts.failed(
        settings(uc),
        uc,
        score_date(context, uc.schedule.timezone),
        run.run_id,
        getattr(context.get("ti"), "task_id", None),
        _report_url(run.dag_id, run.run_id),
    )
    alerts.send(uc, alert, CONN_SMTP)


def alert_late(use_case: str, context: dict[str, Any]) -> None:
    """The nightly DAG's deadline callback (``schedule.deadline`` after the run was
    queued): tell the notifier the night is not published yet, unless it is by now.
    Run by the executor with the scheduler's plain context (the run as JSON)."""
    import logging
    from datetime import datetime

    from pipeline.conf import usecase
    from pipeline.run import alerts

    uc = usecase.load(use_case)
    run = context["dag_run"]  # the REST API's DAGRunResponse, as JSON
    run_id = run.get("dag_run_id") or run["run_id"]
    moments = {
        key: datetime.fromisoformat(run[key]) if isinstance(run.get(key), str) else run.get(key)
        for key in ("data_interval_end", "logical_date", "run_after")
    }
    deadline = context["deadline"]["deadline_time"]
    if isinstance(deadline, str):
        deadline = datetime.fromisoformat(deadline)
    if str(run.get("state")) == "failed":
        logging.getLogger("nightscore.alerts").info(
            "%s %s failed before its deadline: its failure was alerted",
            run["dag_id"],
            run_id,
        )
        return
    alert = alerts.late(
        settings(uc),
        uc,
        score_date(moments, uc.schedule.timezone),
        run_id,
        deadline,
        _report_url(run["dag_id"], run_id),
        airflow_state=str(run.get("state") or "queued"),
    )
    if alert is not None:
        alerts.send(uc, alert, CONN_SMTP)
