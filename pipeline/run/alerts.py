"""Alerts: a night that failed, or that is not published by its deadline, tells people.

Airflow calls these through ``plugins/nightscore_alerts.py``: the nightly DAG's failure
callback (a failed night) and its deadline alert (``schedule.deadline`` after the run was
queued). The message names the use case, the night's date, the failed stage and its error
(or how far the night got), what readers are served now, and the run's report; it goes out
through an Airflow notifier (``alerts``): email by default, any notifier by configuration.
"""

from __future__ import annotations

import html
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from pipeline.conf.config import Settings
from pipeline.conf.sections import DEFAULT_NOTIFIER
from pipeline.conf.usecase import UseCase
from pipeline.reports.run_report import failed_stage
from pipeline.store import db
from pipeline.store.ledger import NIGHT_STAGES

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "[nightscore]"
DEFAULT_SENDER = "nightscore <nightscore@nightscore.invalid>"


@dataclass(frozen=True)
class Alert:
    """One message about one night of one use case."""

    use_case: str
    score_date: date
    run_id: str
    kind: Literal["failed", "late"]
    what: str  # what went wrong: the failed stage and its error, or the missed deadline
    progress: str  # how far the night got
    served: str  # what readers are served now
    report_url: str

    @property
    def subject(self) -> str:
        verb = "failed" if self.kind == "failed" else "is not published by its deadline"
        return f"{SUBJECT_PREFIX} {self.use_case}: the night of {self.score_date} {verb}"

    def lines(self) -> list[str]:
        return [
            self.what,
            self.progress,
            self.served,
            f"Report: {self.report_url}",
            f"Run: {self.run_id}",
        ]

    @property
    def text(self) -> str:
        return "\n\n".join(self.lines())

    @property
    def html(self) -> str:
        paragraphs = [f"<p>{html.escape(line)}</p>" for line in self.lines()[:3]]
        link = html.escape(self.report_url, quote=True)
        paragraphs.append(f'<p>Report: <a href="{link}">{link}</a></p>')
        paragraphs.append(f"<p>Run: <code>{html.escape(self.run_id)}</code></p>")
        return "\n".join(paragraphs)


def _night(settings: Settings, uc: UseCase, run_id: str, score_date: date) -> dict[str, Any]:
    """The ledger row of the run, the newest publication and the date's own publication,
    in one query (each None when there is none)."""
    (row,) = db.records(
        settings.database_url,
        """
        SELECT (SELECT row_to_json(r) FROM (
                    SELECT status, error, stages FROM ml.runs
                    WHERE use_case = %s AND run_id = %s
                    ORDER BY started_at DESC LIMIT 1) r) AS run,
               (SELECT row_to_json(p) FROM (
                    SELECT score_date, model_version, run_id FROM ml.publications
                    WHERE use_case = %s ORDER BY score_date DESC LIMIT 1) p) AS served,
               (SELECT row_to_json(p) FROM (
                    SELECT run_id, rows FROM ml.publications
                    WHERE use_case = %s AND score_date = %s) p) AS published
        """,
        (uc.name, run_id, uc.name, uc.name, score_date),
    )
    return row


def served_text(uc: UseCase, served: Mapping[str, Any] | None) -> str:
    """What readers of the use case's served views get now."""
    if served is None:
        return f"Nothing is served: no night of {uc.name} was ever published."
    return (
        f"Still served: predictions.{uc.score_table}_latest holds the night of "
        f"{served['score_date']} (model {served['model_version']}, run {served['run_id']})."
    )


def _progress(run: Mapping[str, Any] | None) -> str:
    if run is None:
        return "The night never started its work (it was queued, or waited for its data or turn)."
    stages = run.get("stages") or {}
    done = [name for name in stages if (stages[name] or {}).get("status") == "ok"]
    to_do = [s for s in NIGHT_STAGES if s not in stages and not s.startswith("score_partition")]
    parts = [f"Done: {', '.join(done) or 'nothing'}."]
    if to_do:
        parts.append(f"Not done: {', '.join(to_do)}.")
    return " ".join(parts)


def failed(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    run_id: str,
    task_id: str | None,
    report_url: str,
) -> Alert:
    """The alert of a failed night: its first failed stage (else the failed Airflow task)
    and the error the ledger recorded."""
    night = _night(settings, uc, run_id, score_date)
    run = night["run"]
    stage = failed_stage(run) or task_id or "an unknown task"
    error = str((run or {}).get("error") or "no error recorded: see the task's log")
    error = error.removeprefix(f"{stage}: ")  # the ledger names the stage too
    what = f"The night of {score_date} of {uc.name} failed at {stage}: {error}"
    published = night["published"]
    if published is not None and published["run_id"] == run_id:
        what += f" Its scores were published before the failure ({published['rows']:,} rows)."
    return Alert(
        use_case=uc.name,
        score_date=score_date,
        run_id=run_id,
        kind="failed",
        what=what,
        progress=_progress(run),
        served=served_text(uc, night["served"]),
        report_url=report_url,
    )


def late(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    run_id: str,
    deadline: datetime,
    report_url: str,
    airflow_state: str = "queued",
) -> Alert | None:
    """The alert of a night not published by its deadline; None when the date is
    published by now (the night only finishes late). Its state is the ledger's, else
    Airflow's (a night waiting for its data or turn has no ledger row yet)."""
    night = _night(settings, uc, run_id, score_date)
    if night["published"] is not None:
        log.info("the night of %s is published: no late alert", score_date)
        return None
    status = str((night["run"] or {}).get("status") or airflow_state)
    return Alert(
        use_case=uc.name,
        score_date=score_date,
        run_id=run_id,
        kind="late",
        what=(
            f"The night of {score_date} of {uc.name} is not published by its deadline "
            f"({deadline:%Y-%m-%d %H:%M %Z}: schedule.deadline {uc.schedule.deadline} after "
            f"it was queued); it is {status}."
        ),
        progress=_progress(night["run"]),
        served=served_text(uc, night["served"]),
        report_url=report_url,
    )


def _literal(text: str) -> str:
    """Text a notifier's Jinja rendering leaves as it is."""
    if any(token in text for token in ("{{", "{%", "{#")):
        return "{% raw %}" + text + "{% endraw %}"
    return text


def notifier_arguments(uc: UseCase, alert: Alert, smtp_conn_id: str) -> dict[str, Any]:
    """The arguments of the use case's notifier for this alert: ``alerts.options`` with
    ``{subject}``, ``{text}`` and ``{html}`` filled in, over the email defaults when the
    notifier is Airflow's SMTP one."""
    values = {
        "subject": _literal(alert.subject),
        "text": _literal(alert.text),
        "html": _literal(alert.html),
    }

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            for key, text in values.items():
                value = value.replace("{" + key + "}", text)
        return value

    options = {key: fill(value) for key, value in uc.alerts.options.items()}
    if uc.alerts.notifier != DEFAULT_NOTIFIER:
        return options
    return {
        "to": list(uc.alerts.to),
        "from_email": DEFAULT_SENDER,
        "subject": values["subject"],
        "html_content": values["html"],
        "smtp_conn_id": smtp_conn_id,
    } | options


def send(uc: UseCase, alert: Alert, smtp_conn_id: str) -> bool:
    """Send ``alert`` through the use case's notifier; False (and a log line saying why)
    when nobody is configured to hear it. The alert is logged either way."""
    log.warning("%s\n%s", alert.subject, alert.text)
    if not uc.alerts.on_failure and alert.kind == "failed":
        log.info("alerts.on_failure is false: no alert for %s", alert.subject)
        return False
    if uc.alerts.notifier == DEFAULT_NOTIFIER and not (uc.alerts.to or "to" in uc.alerts.options):
        log.warning("%s; nobody is told: set alerts.to in %s", alert.subject, uc.source)
        return False
    module, _, name = uc.alerts.notifier.rpartition(".")
    notifier = getattr(importlib.import_module(module), name)(
        **notifier_arguments(uc, alert, smtp_conn_id)
    )
    notifier({"alert": alert.text})
    log.info("sent %s through %s", alert.subject, uc.alerts.notifier)
    return True
