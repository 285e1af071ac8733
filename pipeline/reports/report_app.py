"""The web app serving the HTML reports (Airflow's API server mounts it, see
``plugins/nightscore_reports.py``); the URLs, files and checks are ``pipeline.reports.report_site``.

Nothing here imports Airflow: who may read what is the :class:`Access` the caller passes in.
FastAPI reads the route annotations at run time, so its names are imported at module level
(this module is imported only by the plugin and the tests).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from pipeline.conf.config import Settings
from pipeline.reports import report_site, run_pages, run_status

if TYPE_CHECKING:
    from pipeline.conf.usecase import UseCase


class Access(Protocol):
    """Who is asking, and what they may read (Airflow's login and DAG permissions)."""

    async def user(self, request: Any) -> Any:
        """The signed-in user; raises an HTTP error (401) when there is none."""

    def may_read(self, user: Any, use_case: str) -> bool:
        """Whether ``user`` may read the reports of ``use_case`` (its DAGs)."""


def create_app(
    settings: Callable[[], Settings],
    use_cases: Callable[[], Sequence[UseCase]],
    access: Access | None = None,
    runs: Callable[[str, str], run_status.RunStatus | None] | None = None,
) -> Any:
    """The FastAPI app serving the reports (mounted at :data:`report_site.URL_PREFIX`).

    ``settings`` and ``use_cases`` are called per request, off the event loop (nothing is
    resolved at import or mount time; they may read files or a database). Without ``access`` every request is allowed (tests, a private machine).
    ``runs(dag_id, run_id)`` says what Airflow knows of a run (None: no such run); with it,
    a run's tab shows a run without a report (yet) as its state and what it waits for.
    """
    app = FastAPI(title="nightscore reports", docs_url=None, redoc_url=None, openapi_url=None)

    async def readable(request: Request, use_case: str | None = None) -> list[str]:
        """The use cases this request may read (all of them, or ``use_case`` only)."""
        known = [uc.name for uc in await run_in_threadpool(use_cases)]
        user = await access.user(request) if access is not None else None
        allowed = [n for n in known if access is None or access.may_read(user, n)]
        if use_case is None:
            return allowed
        if use_case in known and use_case not in allowed:
            raise HTTPException(403, f"you may not read the reports of {use_case}")
        return allowed

    def up(levels: int, path: str) -> str:
        return "../" * levels + path

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        allowed = await readable(request)
        text = await run_in_threadpool(lambda: report_site.index_html(settings(), allowed))
        return HTMLResponse(text)

    @app.get("/runs/{dag_id}/{run_id}", response_model=None)
    async def run_night(
        request: Request, dag_id: str, run_id: str
    ) -> RedirectResponse | HTMLResponse:
        return await _redirect(request, dag_id, run_id, "nightly", levels=3)

    @app.get("/runs/{dag_id}/{run_id}/evaluation", response_model=None)
    async def run_evaluation(
        request: Request, dag_id: str, run_id: str
    ) -> RedirectResponse | HTMLResponse:
        return await _redirect(request, dag_id, run_id, "evaluation", levels=4)

    async def _redirect(
        request: Request, dag_id: str, run_id: str, kind: str, levels: int
    ) -> RedirectResponse | HTMLResponse:
        allowed = await readable(request, dag_id.removesuffix(report_site.NIGHTLY_SUFFIX))
        use_case = report_site.use_case_of(dag_id, allowed)
        status = None
        if runs is not None and kind == "nightly" and use_case is not None:
            status = await run_in_threadpool(runs, dag_id, run_id)
        live = status is not None and status.live
        try:
            target = await run_in_threadpool(
                lambda: report_site.run_target(settings(), allowed, dag_id, run_id, kind, live=live)
            )
        except LookupError as err:
            if status is None or use_case is None:
                return _missing(str(err))
            nightly = dag_id.endswith(report_site.NIGHTLY_SUFFIX)
            text = await run_in_threadpool(
                lambda: run_status.page_html(settings(), status, use_case, nightly=nightly)
            )
            return HTMLResponse(text, headers={"Cache-Control": "no-cache"})
        # relative to this URL: <prefix>/runs/<dag>/<run>[/evaluation] -> <prefix>/<uc>/...
        return RedirectResponse(up(levels - 1, target.split("/", 1)[1]), status_code=307)

    @app.get("/{use_case}/{kind}/{ident}", response_model=None)
    async def report(
        request: Request, use_case: str, kind: str, ident: str
    ) -> FileResponse | HTMLResponse:
        allowed = await readable(request, use_case)
        if kind in run_pages.KINDS:
            try:
                text = await run_in_threadpool(
                    lambda: run_pages.page_html(
                        settings(), use_cases(), allowed, use_case, kind, ident
                    )
                )
            except LookupError as err:
                return _missing(str(err))
            return HTMLResponse(text, headers={"Cache-Control": "no-cache"})
        try:
            path = await run_in_threadpool(
                lambda: report_site.resolve(settings(), allowed, use_case, kind, ident)
            )
        except LookupError as err:
            raise HTTPException(404, str(err)) from None
        return FileResponse(
            path,
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    return app


def _missing(why: str) -> HTMLResponse:
    """A 404 as a page (a run's report tab shows it in the UI), never raw JSON."""
    from pipeline.reports.pages import simple_page

    return HTMLResponse(
        simple_page(
            "No report here",
            f"<p>{html.escape(why)}.</p><p class='note'>Every report: "
            "<a href='/nightscore/'>nightscore reports</a>.</p>",
        ),
        status_code=404,
    )
