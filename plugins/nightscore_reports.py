"""Airflow plugin: the nightscore HTML reports, served by Airflow's API server and linked from
the UI.

- ``fastapi_apps``: ``pipeline.report_site``'s app at ``/nightscore`` (index, nightly and
  evaluation reports); a request needs the Airflow login (the UI's cookie or a bearer
  token) and read access to the use case's DAG.
- ``global_operator_extra_links``: "Nightly report" on ``write_report`` and "Evaluation
  report" on ``evaluate_challenger`` / ``approve_promotion`` of every ``<use_case>_nightly``.
- ``external_views``: a "Run report" tab on a DAG run (a nightly run's night, a campaign or
  monitoring run's page), and "nightscore reports" in the navigation.

The logic lives in ``pipeline.report_site``; this file only adapts Airflow to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from pipeline import report_app, report_site

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


def _settings() -> Any:
    """The serving database of the ``nightscore_db`` connection (else the env vars), the
    reports under ``$NIGHTSCORE_HOME``."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from pipeline.config import load_settings, url_from_parts

    try:
        conn = Connection.get_connection_from_secrets("nightscore_db")
        url = url_from_parts(conn.host, conn.port, conn.login, conn.password, conn.schema)
    except AirflowNotFoundException:
        url = None
    return load_settings(database_url=url)


def _use_cases() -> Any:
    from pipeline import usecase

    return usecase.load_all()


app = report_app.create_app(_settings, _use_cases, _AirflowAccess())


class NightscoreReportsPlugin(AirflowPlugin):
    name = "nightscore_reports"
    fastapi_apps: ClassVar[list[Any]] = [
        {"app": app, "url_prefix": report_site.URL_PREFIX, "name": "nightscore reports"}
    ]
    global_operator_extra_links: ClassVar[list[Any]] = [NightlyReportLink(), EvaluationReportLink()]
    external_views: ClassVar[list[Any]] = [
        {
            # a nightly run's night; a campaign or monitoring run's page (pipeline.run_pages)
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
