"""Airflow plugin: the nightscore HTML reports, served by Airflow's API server and linked from
the UI.

- ``fastapi_apps``: ``pipeline.reports.report_site``'s app at ``/nightscore`` (index, nightly and
  evaluation reports); a request needs the Airflow login (the UI's cookie or a bearer
  token) and read access to the use case's DAG.
- ``global_operator_extra_links``: "Nightly report" on ``write_report`` and "Evaluation
  report" on ``evaluate_challenger`` / ``approve_promotion`` of every ``<use_case>_nightly``.
- ``external_views``: a "Run report" tab on a DAG run (a nightly run's night, a campaign or
  monitoring run's page; a run without one yet: its state and what it waits for, read
  from Airflow's database), and "nightscore reports" in the navigation.

The logic lives in ``pipeline.reports.report_site``; this file only adapts Airflow to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from pipeline.reports import report_app, report_site, run_status

NIGHTLY_TASKS = {"write_report"}
EVALUATION_TASKS = {"evaluate_challenger", "approve_promotion"}


def _base_url() -> str:
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def _absolute(path: str) -> str:
    """A link the UI opens in a new tab: absolute when ``[api] base_url`` is set."""
    base = _base_url()
    return f"{base}/{path}" if base else f"/{path}"


class NightlyReportLink(BaseOperatorLink):
    """The night's report, from the ``write_report`` task of a nightly run."""

    name = "Nightly report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if ti_key.task_id not in NIGHTLY_TASKS or not ti_key.dag_id.endswith("_nightly"):
            return ""
        return _absolute(report_site.run_path(ti_key.dag_id, ti_key.run_id))


class EvaluationReportLink(BaseOperatorLink):
    """The challenger's evaluation report, from the tasks that decide on it."""

    name = "Evaluation report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if ti_key.task_id not in EVALUATION_TASKS or not ti_key.dag_id.endswith("_nightly"):
            return ""
        return _absolute(report_site.run_path(ti_key.dag_id, ti_key.run_id, evaluation=True))


class _AirflowAccess:
    """The Airflow login (JWT from the Authorization header or the UI's cookie) and DAG
    read permission, exactly as Airflow's own REST routes check them."""

    async def user(self, request: Any) -> Any:
        from airflow.api_fastapi.core_api.security import get_user
        from fastapi.security.utils import get_authorization_scheme_param

        scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
        bearer = None
        if scheme.lower() == "bearer" and token:
            from fastapi.security import HTTPAuthorizationCredentials

            bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token)
        return await get_user(request, None, bearer)

    def may_read(self, user: Any, use_case: str) -> bool:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        return bool(
            get_auth_manager().is_authorized_dag(
                method="GET", user=user, details=DagDetails(id=f"{use_case}_nightly")
            )
        )


def _run_status(dag_id: str, run_id: str) -> run_status.RunStatus | None:
    """What Airflow's database says of a run and of what holds it back: its DAG (or
    backfill) paused, the runs filling its ``max_active_runs``, its waiting tasks. The API
    server reads Airflow's database directly, as its own routes do."""
    from airflow.models.backfill import Backfill
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            return None
        dag = session.get(DagModel, dag_id)
        backfill = session.get(Backfill, run.backfill_id) if run.backfill_id else None
        limiter = backfill if backfill is not None else dag  # whose max_active_runs applies
        paused = "DAG" if dag is not None and dag.is_paused else None
        if backfill is not None and backfill.is_paused:
            paused = paused or "backfill"
        # the scheduler counts a DAG's running runs apart from each backfill's
        same_kind = (
            DagRun.backfill_id.is_(None) if backfill is None else DagRun.backfill_id == backfill.id
        )
        running = session.execute(
            select(DagRun.run_id, DagRun.start_date)
            .where(
                DagRun.dag_id == dag_id,
                DagRun.state == "running",
                DagRun.run_id != run_id,
                same_kind,
            )
            .order_by(DagRun.start_date)
        ).all()
        waiting = session.scalars(
            select(TaskInstance.task_id)
            .where(
                TaskInstance.dag_id == dag_id,
                TaskInstance.run_id == run_id,
                TaskInstance.state.in_(("up_for_reschedule", "deferred")),
            )
            .distinct()
            .order_by(TaskInstance.task_id)
        ).all()
        return run_status.RunStatus(
            dag_id=dag_id,
            run_id=run_id,
            state=str(getattr(run.state, "value", run.state)),
            run_after=run.run_after,
            queued_at=run.queued_at,
            started_at=run.start_date,
            backfill=backfill is not None,
            paused=paused,
            max_active_runs=limiter.max_active_runs if limiter is not None else None,
            running=tuple((r, since) for r, since in running),
            waiting_at=tuple(waiting),
        )


def _settings() -> Any:
    """The serving database of the ``nightscore_db`` connection (else the env vars), the
    reports under ``$NIGHTSCORE_HOME``."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from pipeline.conf.config import load_settings
    from pipeline.conf.urls import url_from_parts

    try:
        conn = Connection.get_connection_from_secrets("nightscore_db")
        url = url_from_parts(conn.host, conn.port, conn.login, conn.password, conn.schema)
    except AirflowNotFoundException:
        url = None
    return load_settings(database_url=url)


def _use_cases() -> Any:
    from pipeline.conf import usecase

    return usecase.load_all()


app = report_app.create_app(_settings, _use_cases, _AirflowAccess(), _run_status)


class NightscoreReportsPlugin(AirflowPlugin):
    name = "nightscore_reports"
    fastapi_apps: ClassVar[list[Any]] = [
        {"app": app, "url_prefix": report_site.URL_PREFIX, "name": "nightscore reports"}
    ]
    global_operator_extra_links: ClassVar[list[Any]] = [NightlyReportLink(), EvaluationReportLink()]
    external_views: ClassVar[list[Any]] = [
        {
            # a nightly run's night; a campaign or monitoring run's page (pipeline.reports.run_pages)
            "name": "Run report",
            # the UI fills in {DAG_ID} and {RUN_ID}; relative to its base URL
            "href": f"{report_site.URL_PREFIX[1:]}/runs/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "nightscore_night",
        },
        {
            "name": "nightscore reports",
            "href": f"{report_site.URL_PREFIX[1:]}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "nightscore_reports",
        },
    ]
