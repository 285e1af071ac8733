"""The HTML reports over HTTP: their URLs, their files, and a small web app that serves them.

Airflow's API server mounts the app (``plugins/nightscore_reports.py``) under
:data:`URL_PREFIX`, so a report opens from the Airflow UI with the UI's own login. Routes,
relative to the prefix:

- ``/``: every use case with its nights (newest first, with how each run ended and what is
  served) and its evaluations;
- ``/<use_case>/nightly/<YYYY-MM-DD>``: the nightly report of a score date (its newest
  attempt's), and ``/<use_case>/nightly/<YYYY-MM-DD>-attempt-<n>``: the report of each
  attempt of the date, kept when a later one runs (a re-run, a backfill);
- ``/<use_case>/evaluation/<version>``: the evaluation report of a challenger;
- ``/<use_case>/campaign/<YYYY-MM-DD>``, ``/<use_case>/monitoring/<YYYY-MM-DD>``: the pages
  of the campaign and monitoring DAGs (``pipeline.reports.run_pages``, built on request);
- ``/runs/<dag_id>/<run_id>`` and ``/runs/<dag_id>/<run_id>/evaluation``: a redirect to the
  report of an Airflow run (what the task links and the run's tab open): a nightly run's
  night, a campaign or monitoring run's page; a run without one (yet) gets a page with its
  state and what it waits for or behind (``pipeline.reports.run_status``).

Only files under ``<home>/reports/<use_case>/{nights,evaluations}/`` are ever read: the use
case must be a known one, the date an ISO date and the version a registry-shaped name, and
the resolved path must still lie in that folder. The web app is ``pipeline.reports.report_app``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from urllib.parse import quote

from pipeline.conf.config import Settings
from pipeline.store import db

URL_PREFIX = "/nightscore"
KINDS = {"nightly": ("nights", "score date"), "evaluation": ("evaluations", "model version")}
INDEX_NIGHTS = 60  # newest nights listed per use case
INDEX_EVALUATIONS = 30
NIGHTLY_SUFFIX = "_nightly"
DAG_SUFFIXES = (NIGHTLY_SUFFIX, "_monitoring", "_campaign")  # the DAGs of a use case

_NIGHT = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:-attempt-([1-9][0-9]{0,5}))?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_USE_CASE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
# Airflow run ids (manual__, scheduled__, backfill__, asset_triggered__); CLI and test runs
# have no Airflow page to link to
_AIRFLOW_RUN = re.compile(r"^(manual|scheduled|backfill|asset_triggered|dataset_triggered)__")


def _night_name(score_date: date | str, attempt: int | None) -> str:
    day = score_date if isinstance(score_date, str) else score_date.isoformat()
    return day if attempt is None else f"{day}-attempt-{int(attempt)}"


def report_path(use_case: str, score_date: date | str, attempt: int | None = None) -> str:
    """URL path of a night's report (its newest attempt's, or attempt ``attempt``'s),
    relative to the API server's base URL (no leading '/').

    Relative, so it works behind any base URL: in the Airflow UI a relative link resolves
    against the UI's ``<base href>``; elsewhere join it to ``[api] base_url``.
    """
    return f"{URL_PREFIX[1:]}/{quote(use_case)}/nightly/{quote(_night_name(score_date, attempt))}"


def evaluation_path(use_case: str, version: str) -> str:
    """URL path of a challenger's evaluation report, relative to the API server's base URL."""
    return f"{URL_PREFIX[1:]}/{quote(use_case)}/evaluation/{quote(version, safe='')}"


def run_page_path(use_case: str, kind: str, day: date) -> str:
    """URL path of a campaign or monitoring page (``pipeline.reports.run_pages``) of a date."""
    return f"{URL_PREFIX[1:]}/{quote(use_case)}/{quote(kind)}/{day.isoformat()}"


def run_path(dag_id: str, run_id: str, evaluation: bool = False) -> str:
    """URL path redirecting to the nightly (or evaluation) report of an Airflow run."""
    path = f"{URL_PREFIX[1:]}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"
    return path + ("/evaluation" if evaluation else "")


def airflow_run_path(use_case: str, run_id: str) -> str | None:
    """URL path of the Airflow UI page of a nightly run, or None for a run Airflow never saw."""
    if not _AIRFLOW_RUN.match(run_id):
        return None
    return f"dags/{quote(use_case + NIGHTLY_SUFFIX, safe='')}/runs/{quote(run_id, safe='')}"


def night_file(
    settings: Settings, use_case: str, score_date: date, attempt: int | None = None
) -> Path:
    """Where a night's report is written: the newest attempt's of the date, or attempt
    ``attempt``'s (each attempt of a date keeps its own)."""
    return settings.reports / use_case / "nights" / f"{_night_name(score_date, attempt)}.html"


def evaluation_file(settings: Settings, use_case: str, version: str) -> Path:
    """Where a challenger's evaluation report is written."""
    return settings.reports / use_case / "evaluations" / f"{version}.html"


def resolve(settings: Settings, known: Sequence[str], use_case: str, kind: str, ident: str) -> Path:
    """The report file behind a URL, after validating every part of it.

    Raises:
        LookupError: the use case is unknown, the kind is not ``nightly``/``evaluation``, the
            identifier is not a date / version, or no such report was written.
    """
    if not _USE_CASE.match(use_case) or use_case not in known:
        raise LookupError(f"no use case {use_case!r}")
    if kind not in KINDS:
        raise LookupError(f"no kind of report {kind!r}")
    if kind == "nightly":
        night = _NIGHT.match(ident)
        if night is None:
            raise LookupError(f"not a date (YYYY-MM-DD, or YYYY-MM-DD-attempt-N): {ident!r}")
        try:
            day = date.fromisoformat(night[1])
        except ValueError:
            raise LookupError(f"not a date: {ident!r}") from None
        path = night_file(settings, use_case, day, int(night[2]) if night[2] else None)
    else:
        if not _VERSION.match(ident) or ".." in ident:
            raise LookupError(f"not a model version: {ident!r}")
        path = evaluation_file(settings, use_case, ident)
    folder = (settings.reports / use_case / KINDS[kind][0]).resolve()
    resolved = path.resolve()
    if resolved.parent != folder or not resolved.is_file():
        raise LookupError(f"no {kind} report of {use_case} for {KINDS[kind][1]} {ident}")
    return resolved


def _run_page(settings: Settings, dag_id: str, run_id: str) -> tuple[str, str, date] | None:
    """(use case, kind, date) of the page a campaign or monitoring run opens: the newest
    date it recorded (``pipeline.reports.run_pages.record``), or None when it recorded none."""
    found = db.scalar(
        settings.database_url,
        "SELECT json_build_array(use_case, kind, score_date) FROM monitoring.run_pages "
        "WHERE dag_id = %s AND run_id = %s ORDER BY score_date DESC LIMIT 1",
        (dag_id, run_id),
    )
    return None if found is None else (found[0], found[1], date.fromisoformat(found[2]))


def use_case_of(dag_id: str, known: Sequence[str]) -> str | None:
    """The use case among ``known`` whose DAG ``dag_id`` is, else None."""
    for suffix in DAG_SUFFIXES:
        if dag_id.endswith(suffix) and dag_id.removesuffix(suffix) in known:
            return dag_id.removesuffix(suffix)
    return None


def run_target(
    settings: Settings,
    known: Sequence[str],
    dag_id: str,
    run_id: str,
    kind: str,
    *,
    live: bool = False,
) -> str:
    """URL path (relative to the API base) of the report an Airflow run wrote.

    Args:
        live: the run is still queued or running: only its own attempt's report will do
            (the date's newest may be another run's).

    Raises:
        LookupError: the DAG is not a known use case's nightly DAG, or the run wrote no such
            report (a night that never reached its report, a run that trained no challenger).
    """
    if kind == "nightly" and not dag_id.endswith(NIGHTLY_SUFFIX):
        page = _run_page(settings, dag_id, run_id)
        if page is None or page[0] not in known:
            raise LookupError(
                f"run {run_id} of {dag_id} has no report yet (a campaign run has one once it "
                "built an audience, a monitoring run once it evaluated its night)"
            )
        return run_page_path(*page)
    use_case = dag_id.removesuffix(NIGHTLY_SUFFIX)
    if not dag_id.endswith(NIGHTLY_SUFFIX) or use_case not in known:
        raise LookupError(f"{dag_id!r} is not the nightly DAG of a use case")
    if kind == "nightly":
        found = db.scalar(
            settings.database_url,
            "SELECT json_build_array(score_date, attempt) FROM ml.runs "
            "WHERE use_case = %s AND run_id = %s ORDER BY started_at DESC LIMIT 1",
            (use_case, run_id),
        )
        if found is None:
            raise LookupError(f"run {run_id} of {use_case} is not in the ledger")
        day, attempt = date.fromisoformat(found[0]), found[1]
        # the run's own report; a run from before reports were kept per attempt: the date's
        if attempt is not None and night_file(settings, use_case, day, attempt).is_file():
            return report_path(use_case, day, attempt)
        if live:
            raise LookupError(f"run {run_id} of {use_case} has not written its report yet")
        return report_path(use_case, day)
    version = db.scalar(
        settings.database_url,
        "SELECT challenger FROM ml.evaluations WHERE use_case = %s AND run_id = %s "
        "ORDER BY created_at DESC LIMIT 1",
        (use_case, run_id),
    )
    if version is None:
        raise LookupError(f"run {run_id} of {use_case} evaluated no challenger")
    return evaluation_path(use_case, version)


# --- the index -------------------------------------------------------------------------------


STATUS_COLOURS = {
    "published": "#1e7b34",
    "failed": "#b3261e",
    "abandoned": "#b3261e",
    "stopped": "#b26a00",
    "running": "#1f5fa8",
    "dry_run": "#555555",
}


def _badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#555555")
    return f'<span class="badge" style="background:{colour}">{html.escape(status)}</span>'


def index_html(settings: Settings, use_cases: Sequence[str]) -> str:
    """One page listing, per use case, its nights and evaluations, newest first.

    A night shows its newest attempt's state (published, failed, ...), the model it scored
    with and, when it failed, the error; the use case's header says what readers are served.
    """
    from pipeline.reports.pages import simple_page

    esc = html.escape
    sections = []
    for name in use_cases:
        served = db.records(
            settings.database_url,
            "SELECT score_date, model_version, run_id FROM ml.publications WHERE use_case = %s "
            "ORDER BY score_date DESC LIMIT 1",
            (name,),
        )
        nights = db.records(
            settings.database_url,
            "SELECT DISTINCT ON (score_date) score_date, run_id, attempt, status, model_version, "
            "rows_published, error FROM ml.runs WHERE use_case = %s "
            "ORDER BY score_date DESC, started_at DESC LIMIT %s",
            (name, INDEX_NIGHTS),
        )
        evaluations = db.records(
            settings.database_url,
            "SELECT challenger, champion, decision, holdout_as_of, run_id, created_at "
            "FROM ml.evaluations WHERE use_case = %s ORDER BY created_at DESC LIMIT %s",
            (name, INDEX_EVALUATIONS),
        )
        if served:
            s = served[0]
            now = (
                f"served now: scores of <strong>{s['score_date']}</strong> by "
                f"<code>{esc(s['model_version'])}</code>"
            )
        else:
            now = "nothing published yet"
        attempts = db.records(
            settings.database_url,
            "SELECT score_date, attempt, status FROM ml.runs WHERE use_case = %s "
            "AND score_date = ANY(%s) AND attempt IS NOT NULL ORDER BY score_date, attempt",
            (name, [n["score_date"] for n in nights]),
        )
        night_rows = []
        for n in nights:
            has_report = night_file(settings, name, n["score_date"]).is_file()
            day = esc(str(n["score_date"]))
            link = (
                f'<a href="{esc(report_path(name, n["score_date"]).split("/", 1)[1])}">{day}</a>'
                if has_report
                else f"{day} <span class='note'>(no report)</span>"
            )
            # every attempt of the date with a report of its own, oldest first
            kept = " ".join(
                f'<a href="{esc(report_path(name, a["score_date"], a["attempt"]).split("/", 1)[1])}"'
                f' title="{esc(a["status"])}">{a["attempt"]}</a>'
                for a in attempts
                if a["score_date"] == n["score_date"]
                and night_file(settings, name, a["score_date"], a["attempt"]).is_file()
            )
            error = esc((n["error"] or "")[:300])
            published = "" if n["rows_published"] is None else f"{n['rows_published']:,}"
            night_rows.append(
                f"<tr><td>{link}</td><td>{_badge(n['status'])}</td>"
                f"<td class='num'>{kept or n['attempt'] or ''}</td>"
                f"<td><code>{esc(n['model_version'] or '')}</code></td>"
                f"<td class='num'>{published}</td><td class='note'>{error}</td></tr>"
            )
        eval_rows = []
        for e in evaluations:
            version = esc(e["challenger"])
            if evaluation_file(settings, name, e["challenger"]).is_file():
                href = esc(evaluation_path(name, e["challenger"]).split("/", 1)[1])
                version = f'<a href="{href}">{version}</a>'
            eval_rows.append(
                f"<tr><td>{version}</td><td>{_badge(e['decision'])}</td>"
                f"<td><code>{esc(e['champion'] or 'none')}</code></td>"
                f"<td>{esc(str(e['holdout_as_of']))}</td>"
                f"<td>{esc(e['created_at'].strftime('%Y-%m-%d %H:%M'))}</td></tr>"
            )
        sections.append(
            f"<h2 id='{esc(name)}'>{esc(name)}</h2><p class='meta'>{now}</p>"
            "<h3>Nights</h3><table><tr><th>score date</th><th>run state</th><th>attempts</th>"
            "<th>model</th><th>rows published</th><th>error</th></tr>"
            + ("".join(night_rows) or "<tr><td colspan='6' class='note'>no runs yet</td></tr>")
            + "</table><h3>Evaluations</h3><table><tr><th>challenger</th><th>decision</th>"
            "<th>champion</th><th>holdout as of</th><th>evaluated</th></tr>"
            + ("".join(eval_rows) or "<tr><td colspan='5' class='note'>none yet</td></tr>")
            + "</table>"
        )
    body = "".join(sections) or "<p class='note'>no use case you may read</p>"
    return simple_page("nightscore reports", body)
