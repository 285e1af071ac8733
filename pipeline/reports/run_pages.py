"""The report pages of the campaign and monitoring DAGs' runs, built from the database when
they are asked for (``pipeline.reports.report_app`` serves them; a run's report tab opens them).

- The campaign page of a score date: the audience and who was left out of the top band, by
  reason; the control band; the sends by status, with the errors of the failed ones; the
  campaign's own uplift once matured; the experiment pooled over every matured campaign,
  with its interval and power.
- The monitoring page of a date: realized performance by model version of the nights
  matured by then, the retrain requests, the campaigns measured, the experiment pooled and
  the targeting policy in force.

A run of those DAGs records which dates it handled (:func:`record`), so that its report
tab (``/runs/<dag_id>/<run_id>``, ``pipeline.reports.report_site.run_target``) opens the page of
its newest date.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.store import db

KINDS = ("campaign", "monitoring")
RECENT = 20  # rows per table on a page


def record(
    settings: Settings, dag_id: str, run_id: str, use_case: str, kind: str, days: Iterable[date]
) -> None:
    """Record that the run ``run_id`` of ``dag_id`` handled ``days`` (its report tab opens
    the page of the newest)."""
    assert kind in KINDS
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO monitoring.run_pages (dag_id, run_id, use_case, kind, score_date) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(dag_id, run_id, use_case, kind, day) for day in sorted(set(days))],
            )
        conn.commit()
    finally:
        conn.close()


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> str:
    esc = html.escape
    body = "".join(
        "<tr>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    note = f"<tr><td colspan='{len(headers)}' class='note'>{esc(empty)}</td></tr>"
    return f"<table><tr>{head}</tr>{body or note}</table>"


def _page(title: str, sections: Sequence[str]) -> str:
    from pipeline.reports.pages import simple_page

    return simple_page(
        title, "<p class='meta'><a href='../../'>all reports</a></p>" + "".join(sections)
    )


def _points(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):+.1f}"


def _experiment(settings: Settings, uc: UseCase, by: date) -> str:
    """The experiment pooled over the campaigns matured by ``by``, its power and the policy."""
    from pipeline.campaigns import experiment, monitor, policy

    assert uc.campaign is not None
    pooled = monitor.campaign_experiment(settings, uc, matured_by=by)
    esc = html.escape
    return (
        "<h2>The campaign as an experiment</h2>"
        f"<p><b>Pooled over the weekly cohorts matured by {by}:</b> "
        f"{esc(pooled['text'] if pooled else 'no campaign')}.</p>"
        f"<p><b>Power:</b> {esc(experiment.plan_text(experiment.plan_of(uc.campaign)))}.</p>"
        f"<p><b>Targeting:</b> {esc(policy.policy_text(settings, uc))}.</p>"
    )


def _uplift_rows(rows: Sequence[dict[str, Any]]) -> str:
    return _table(
        [
            "campaign",
            "score date",
            "contacted (positive)",
            "control (positive)",
            "left out, selected before",
            "uplift, pp [95% CI]",
        ],
        [
            (
                u["campaign"],
                u["score_date"],
                f"{u['contacted']:,} ({u['contacted_positives']:,})",
                f"{u['control']:,} ({u['control_positives']:,})",
                f"{u['repeat_contacted'] or 0:,} contacted, {u['repeat_control'] or 0:,} control",
                f"{_points(u['uplift'])} [{_points(u['ci_low'])}, {_points(u['ci_high'])}]",
            )
            for u in rows
        ],
        "no campaign has matured",
    )


def campaign_html(settings: Settings, uc: UseCase, day: date) -> str:
    """The campaign page of ``day``.

    Raises:
        LookupError: ``uc`` has no campaign, or built no audience for ``day``.
    """
    if uc.campaign is None:
        raise LookupError(f"{uc.name} has no campaign")
    cfg = uc.campaign
    built = db.records(
        settings.database_url,
        "SELECT * FROM monitoring.campaign_audiences WHERE use_case = %s AND score_date = %s",
        (uc.name, day),
    )
    if not built:
        raise LookupError(f"no {uc.name} audience was built for {day}")
    a = built[0]
    send_log = db.quote_ident("campaigns", cfg.send_log_table)
    sends = db.records(
        settings.database_url,
        f"SELECT status, count(*) AS n FROM {send_log} WHERE campaign = %s GROUP BY 1 ORDER BY 1",
        (a["campaign"],),
    )
    failures = db.records(
        settings.database_url,
        f"SELECT coalesce(error, '') AS error, count(*) AS n FROM {send_log} "
        "WHERE campaign = %s AND status = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT %s",
        (a["campaign"], RECENT),
    )
    measured = db.records(
        settings.database_url,
        "SELECT * FROM monitoring.campaign_uplift WHERE use_case = %s AND campaign = %s",
        (uc.name, a["campaign"]),
    )
    excluded = sorted(a["excluded"].items(), key=lambda kv: -kv[1])
    sections = [
        f"<p class='meta'>campaign <code>{html.escape(a['campaign'])}</code>, ranked by "
        f"<code>{html.escape(a['policy'])}</code>, scores of "
        f"<code>{html.escape(a['model_version'])}</code>; built {a['built_at']:%Y-%m-%d %H:%M}"
        "</p>",
        "<h2>Audience</h2>",
        _table(
            ["top risk band", "audience", "capacity", "comparable control band"],
            [
                (
                    f"{a['band']:,}",
                    f"{a['audience']:,}",
                    f"{cfg.capacity:,}",
                    f"{a['control_band']:,}",
                )
            ],
            "",
        ),
        "<h3>Left out of the band, by reason</h3>",
        _table(
            ["reason", "entities"],
            [(reason.replace("_", " "), f"{n:,}") for reason, n in excluded],
            "nobody",
        ),
        "<h2>Sends</h2>",
        _table(
            ["status", "messages"],
            [(s["status"], f"{s['n']:,}") for s in sends],
            "nothing sent (a dry run renders files and records nothing)",
        ),
        "<h3>Failures</h3>",
        _table(["error", "messages"], [(f["error"], f"{f['n']:,}") for f in failures], "none"),
        "<h2>This campaign's uplift</h2>",
        _uplift_rows(measured),
        _experiment(settings, uc, day),
    ]
    return _page(f"{uc.name}: campaign of {day}", sections)


def monitoring_html(settings: Settings, uc: UseCase, day: date) -> str:
    """The monitoring page of ``day``: what had matured and been measured by then."""
    horizon = uc.label.horizon_days
    realized = db.records(
        settings.database_url,
        "SELECT score_date, model_version, rows, positives, roc_auc, holdout_auc, "
        "lift_top_decile, ece FROM monitoring.realized_performance WHERE use_case = %s "
        "AND score_date + %s <= %s ORDER BY score_date DESC, model_version LIMIT %s",
        (uc.name, horizon, day, RECENT),
    )
    requests = db.records(
        settings.database_url,
        "SELECT requested_at, reason, consumed_by_run FROM ml.retrain_requests "
        "WHERE use_case = %s AND requested_at::date <= %s ORDER BY requested_at DESC LIMIT %s",
        (uc.name, day, RECENT),
    )

    def auc(v: Any) -> str:
        return "" if v is None else f"{float(v):.3f}"

    sections = [
        f"<h2>Realized performance (nights matured by {day}, {horizon} days)</h2>",
        _table(
            ["score date", "model", "rows", "positives", "AUC", "holdout AUC", "lift@10%", "ECE"],
            [
                (
                    r["score_date"],
                    r["model_version"],
                    f"{r['rows']:,}",
                    f"{r['positives']:,}",
                    auc(r["roc_auc"]),
                    auc(r["holdout_auc"]),
                    auc(r["lift_top_decile"]),
                    auc(r["ece"]),
                )
                for r in realized
            ],
            "no night has matured",
        ),
        "<h2>Retrain requests</h2>",
        _table(
            ["requested", "reason", "consumed by run"],
            [
                (
                    f"{r['requested_at']:%Y-%m-%d %H:%M}",
                    r["reason"],
                    r["consumed_by_run"] or "pending",
                )
                for r in requests
            ],
            "none",
        ),
    ]
    if uc.campaign is not None:
        measured = db.records(
            settings.database_url,
            "SELECT * FROM monitoring.campaign_uplift WHERE use_case = %s "
            "AND score_date + %s <= %s ORDER BY score_date DESC LIMIT %s",
            (uc.name, horizon, day, RECENT),
        )
        sections += ["<h2>Campaigns measured</h2>", _uplift_rows(measured)]
        sections.append(_experiment(settings, uc, day))
    return _page(f"{uc.name}: monitoring as of {day}", sections)


def page_html(
    settings: Settings,
    use_cases: Sequence[UseCase],
    allowed: Sequence[str],
    use_case: str,
    kind: str,
    ident: str,
) -> str:
    """The page behind ``/<use_case>/<kind>/<YYYY-MM-DD>``, after validating each part.

    Raises:
        LookupError: an unknown (or unreadable) use case, kind or date, or nothing to show.
    """
    found = {uc.name: uc for uc in use_cases if uc.name in allowed}
    if use_case not in found:
        raise LookupError(f"no use case {use_case!r}")
    if kind not in KINDS:
        raise LookupError(f"no kind of page {kind!r}")
    try:
        day = date.fromisoformat(ident) if len(ident) == 10 else None
    except ValueError:
        day = None
    if day is None:
        raise LookupError(f"not a date (YYYY-MM-DD): {ident!r}")
    uc = found[use_case]
    return (
        campaign_html(settings, uc, day)
        if kind == "campaign"
        else monitoring_html(settings, uc, day)
    )
