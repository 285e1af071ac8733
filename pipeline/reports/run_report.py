"""The night's run report: one self-contained HTML page per night of a use case.

How the run went (a banner with its state, the stage that failed and what readers are
served now; the run's header and seconds per stage), how healthy the scores look (the
score distribution against the previous night, feature drift, realized performance once
labels matured, shadow agreement, scores by segment, the checks) and how the campaign
does (uplift per matured campaign, the campaign as an experiment). The plots are embedded
as base64 PNG; the file is written atomically.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.reports import pages, plots
from pipeline.store.ledger import NIGHT_STAGES


@dataclass(frozen=True)
class NightContext:
    """What a night's report says about the run itself, beyond its plots and checks.

    Attributes:
        run: the run's row of ``ml.runs`` (run_id, attempt, status, error, stages,
            snapshot_sha256, code_version, model_version, rows_published), or None.
        served: the newest row of ``ml.publications`` (score_date, model_version, run_id,
            rows): what readers of ``<table>_latest`` get now, whatever this run did.
        published: the row of ``ml.publications`` for this score date, if any.
        evaluation: this run's row of ``ml.evaluations`` (challenger, decision), if any.
        previous_night: the newest earlier score date with a run, if any.
        shadow: rows of ``monitoring.shadow_agreement`` for this score date.
        segments: per segment value (segment, value, rows, share, mean, top_decile_share),
            from a bounded sample of the night's published scores.
        segment_note: why there is no segment view, or how it was sampled.
        decay_threshold: realized AUC more than this below the holdout AUC is decay.
        airflow_run: URL path (relative to the API base) of the run's Airflow page, if any.
        campaign: sentences on the campaign as an experiment (``pooled``: the uplift over
            weekly cohorts matured by this night; ``plan``: the power calculation;
            ``policy``: the targeting policy in force and why), if the use case has one.
    """

    run: Mapping[str, Any] | None = None
    served: Mapping[str, Any] | None = None
    published: Mapping[str, Any] | None = None
    evaluation: Mapping[str, Any] | None = None
    previous_night: date | None = None
    shadow: Sequence[Mapping[str, Any]] = ()
    campaign: Mapping[str, str] | None = None
    segments: Sequence[Mapping[str, Any]] = ()
    segment_note: str = ""
    decay_threshold: float | None = None
    airflow_run: str | None = None


FAILED_STATES = frozenset({"failed", "abandoned", "stopped"})
# the order stages run in, for the header's seconds per stage
STAGE_ORDER = NIGHT_STAGES


def _stage_rank(name: str) -> tuple[int, str]:
    base = "score_partition" if name.startswith("score_partition_") else name
    return (STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER), name)


def failed_stage(run: Mapping[str, Any] | None) -> str | None:
    """The first stage (in run order) the ledger recorded as failed, if any."""
    stages = (run or {}).get("stages") or {}
    failed = [name for name, info in stages.items() if (info or {}).get("status") == "failed"]
    return min(failed, key=_stage_rank) if failed else None


def _served_sentence(served: Mapping[str, Any] | None) -> str:
    if served is None:
        return "Nothing is served yet: no night of this use case was ever published."
    return (
        f"Readers are served the scores of <strong>{html.escape(str(served['score_date']))}</strong> "
        f"(model <code>{html.escape(str(served['model_version']))}</code>, run "
        f"<code>{html.escape(str(served['run_id']))}</code>)."
    )


def night_banner(score_date: date, context: NightContext) -> tuple[str, str]:
    """(kind, HTML) of the banner at the top of a night's report: how the run ended, why it
    failed, and what readers are served now (``ml.publications``, not this run)."""
    esc = html.escape
    run = context.run or {}
    status = str(run.get("status") or "unknown")
    published = context.published
    ours = published is not None and published.get("run_id") == run.get("run_id")
    served = _served_sentence(context.served)
    if status in FAILED_STATES:
        stage = failed_stage(run)
        where = f" at <code>{esc(stage)}</code>" if stage else ""
        error = esc(str(run.get("error") or "no error recorded"))
        if ours:
            kept = (
                f"Its scores were published before the failure ({published['rows']:,} rows, "  # type: ignore[index]
                "model "
                f"<code>{esc(str(published['model_version']))}</code>) and stay served."  # type: ignore[index]
            )
        else:
            kept = "Nothing of this night was published."
        return "failed", (
            f"<strong>This night {esc(status)}{where}.</strong> {error}<br>{kept} {served}"
        )
    if status == "dry_run":
        return (
            "info",
            f"<strong>Dry run</strong>: scored and validated, nothing published. {served}",
        )
    if status == "published" or ours:
        assert published is not None
        return "ok", (
            f"<strong>Published</strong> {published['rows']:,} rows of {esc(str(score_date))} with model "
            f"<code>{esc(str(published['model_version']))}</code>. {served}"
        )
    return "warn", (
        f"<strong>This night has not published</strong> (run state <code>{esc(status)}</code>). {served}"
    )


def _header_rows(context: NightContext) -> str:
    esc = html.escape
    run = context.run or {}
    stages = run.get("stages") or {}
    decision = stages.get("decide_retrain") or {}
    retrain = decision.get("retrain")
    rows = run.get("rows_published")
    if rows is None:
        rows = (stages.get("build_features") or {}).get("rows")
    sha = str(run.get("snapshot_sha256") or "")
    items = [
        (
            "run",
            f"<code>{esc(str(run.get('run_id', '')))}</code>, attempt {run.get('attempt') or '?'}",
        ),
        ("state", esc(str(run.get("status") or "unknown"))),
        (
            "scored with",
            f"<code>{esc(str(run.get('model_version') or 'no model selected'))}</code>",
        ),
        ("rows", "&mdash;" if rows is None else f"{int(rows):,}"),
        ("snapshot sha256", f'<code title="{esc(sha)}">{esc(sha[:16]) or "&mdash;"}</code>'),
        ("code version", f"<code>{esc(str(run.get('code_version') or ''))}</code>"),
        (
            "retrain",
            "&mdash;"
            if retrain is None
            else f"{'yes' if retrain else 'no'}: {esc(str(decision.get('why', '')))}",
        ),
    ]
    if context.evaluation:
        ev = context.evaluation
        review = ""
        if ev.get("reviewed_at"):
            who = ev.get("reviewed_by") or "nobody (the approval timed out)"
            at = ev["reviewed_at"]
            when = at.strftime("%Y-%m-%d %H:%M %Z") if hasattr(at, "strftime") else str(at)
            review = f"<br><strong>{esc(str(ev['decision']).capitalize())} by {esc(str(who))} at {esc(when)}</strong>"
        items.append(
            (
                "challenger",
                f"<code>{esc(str(ev['challenger']))}</code>: {esc(str(ev['decision']))}"
                + review
                + "".join(f"<br>{esc(str(reason))}" for reason in ev.get("reasons") or []),
            )
        )
    return "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)


def _stage_table(run: Mapping[str, Any] | None) -> str:
    stages = (run or {}).get("stages") or {}
    rows = []
    for name in sorted(stages, key=_stage_rank):
        info = stages[name] or {}
        seconds = info.get("seconds")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(info.get('status', '')))}</td>"
            f'<td class="num">{"&mdash;" if seconds is None else f"{float(seconds):.2f}"}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="3" class="note">no stage recorded</td></tr>'
    return f"<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>{body}</table>"


def _links(use_case: str, context: NightContext) -> str:
    """Links relative to the report's own URL (``<prefix>/<use_case>/nightly/<date>``)."""
    from pipeline.reports import report_site

    esc = html.escape
    links = ['<a href="../../">all reports</a>']
    if context.evaluation:
        version = str(context.evaluation["challenger"])
        href = "../../" + report_site.evaluation_path(use_case, version).split("/", 1)[1]
        links.append(f'<a href="{esc(href)}">evaluation report of {esc(version)}</a>')
    if context.previous_night is not None:
        day = context.previous_night.isoformat()
        links.append(f'<a href="{esc(day)}">previous night: {esc(day)}</a>')
    if context.airflow_run:
        links.append(f'<a href="../../../{esc(context.airflow_run)}" target="_top">Airflow run</a>')
    return f'<p class="links">{"".join(links)}</p>'


def _shadow_rows(shadow: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td><code>{esc(str(r['shadow']))}</code></td><td><code>{esc(str(r['champion']))}</code></td>"
        f'<td class="num">{int(r["rows"]):,}</td><td class="num">{float(r["spearman"]):.3f}</td>'
        f'<td class="num">{float(r["top_decile_overlap"]):.1%}</td>'
        f'<td class="num">+{int(r["audience_enter"])} / &minus;{int(r["audience_leave"])} '
        f"of {int(r['audience_capacity'])}</td></tr>"
        for r in shadow
    )
    return rows or '<tr><td colspan="6" class="note">no shadow model scored this night</td></tr>'


def _segment_rows(segments: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    return "".join(
        f"<tr><td>{esc(str(r['segment']))}</td><td>{esc(str(r['value']))}</td>"
        f'<td class="num">{int(r["rows"]):,}</td><td class="num">{float(r["share"]):.1%}</td>'
        f'<td class="num">{float(r["mean"]):.4f}</td>'
        f'<td class="num">{float(r["top_decile_share"]):.1%}</td></tr>'
        for r in segments
    )


def _score_psi(checks: Sequence[Mapping[str, object]]) -> str:
    found = [c for c in checks if c.get("check_name") == "score_psi"]
    if not found:
        return "no previous published night to compare with"
    c = found[0]
    verdict = "within" if c["passed"] else "BEYOND"
    return (
        f"{html.escape(str(c['found']))} ({verdict} the limit: {html.escape(str(c['expected']))})"
    )


def write_run_report(
    path: Path,
    *,
    use_case: str,
    score_date: date,
    model_version: str | None,
    score_hist: np.ndarray | None,
    previous_hist: np.ndarray | None,
    drift: Sequence[tuple[str, float, bool]],
    checks: Sequence[Mapping[str, object]],
    realized: Sequence[Mapping[str, object]],
    decile_rates: Mapping[str, float] | None,
    uplift: Sequence[Mapping[str, object]] = (),
    context: NightContext | None = None,
) -> Path:
    """One self-contained HTML page for a night: how the run went, what is served, how healthy
    the scores look.

    At the top, a banner: the run's state, the stage that failed and its error, and what
    readers are served now (``context.served``: a failed night leaves the previous night
    served). Then a header (run, attempt, rows, snapshot, code version, the retrain decision),
    links (evaluation, previous night, the Airflow run), seconds per stage, the plots, score
    PSI apart from feature drift, shadow agreement, scores per segment and the checks.

    Args:
        model_version: the model this run scored with (None when it never selected one).
        score_hist / previous_hist: counts of scores in equal bins over [0, 1], tonight and
            the previous published night.
        drift: (feature, PSI, within limit), any order; the top ten are drawn.
        checks: rows of ``monitoring.checks`` (check_name, target, severity, passed, expected, found).
        realized: rows of ``monitoring.realized_performance`` (score_date, model_version,
            roc_auc, holdout_auc); each version's holdout AUC and decay line are drawn.
        decile_rates: positive rate per risk decile of the newest matured night, if any.
        uplift: rows of ``monitoring.campaign_uplift`` (campaign, score_date, contacted,
            contacted_positives, control, control_positives, contacted_rate, control_rate,
            uplift, ci_low, ci_high), in the order to show; rates are fractions.
        context: the run, what is served, links, shadow agreement and segments.
    """
    context = context or NightContext(run={"model_version": model_version})
    esc = html.escape
    charts = [
        (
            "Score distribution: tonight vs the previous night",
            _hist_figure(score_hist, previous_hist),
        ),
        ("Top drifting features (PSI vs the champion's training data)", _drift_figure(drift)),
        (
            "Realized ROC AUC over time, by model version (dashed: holdout AUC; dotted: decay "
            "threshold)",
            _realized_figure(realized, context.decay_threshold),
        ),
        ("Realized lift by risk decile (newest matured night)", _decile_figure(decile_rates)),
    ]
    failed = [c for c in checks if not c["passed"]]
    rows = _check_rows(checks)
    figures = _figures_html(charts)
    kind, banner = night_banner(score_date, context)
    segment_html = _segment_table(context.segments)
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{esc(use_case)} {score_date}</title><style>{pages.STYLE}</style></head>
<body>
<h1>{esc(use_case)}: night of {score_date}</h1>
<div class="banner banner-{kind}">{banner}</div>
{_links(use_case, context)}
<dl class="header">{_header_rows(context)}</dl>
<p class="meta">{len(checks)} checks, {len(failed)} not passing</p>
<h2>Seconds per stage</h2>
{_stage_table(context.run)}
<div class="plots">{figures}</div>
<h2>Drift</h2>
<p>Score PSI vs the previous published night: {_score_psi(checks)}.
Feature drift (PSI per feature vs the scoring model's training data) is the bar chart above.</p>
<h2>Shadow agreement</h2>
<table><tr><th>shadow</th><th>served</th><th>rows</th><th>Spearman</th><th>top-decile overlap</th>
<th>audience change if served</th></tr>
{_shadow_rows(context.shadow)}</table>
<h2>Scores by segment</h2>
{segment_html}<p class="note">{esc(context.segment_note)}</p>
<h2>Checks</h2>
<table><tr><th>check</th><th>target</th><th>severity</th><th>result</th><th>expected</th><th>found</th></tr>
{rows}</table>
<h2>Campaign uplift (once labels matured)</h2>
<table><tr><th>campaign</th><th>score date</th><th>contacted (positive)</th><th>control (positive)</th>
<th>contacted outcome rate</th><th>control outcome rate</th><th>uplift, pp [95% CI]</th></tr>
{_uplift_rows(uplift)}</table>
<p class="note">uplift = control outcome rate &minus; contacted outcome rate: outcomes prevented per
contacted entity, in percentage points. Each campaign counts the entities it selected for the first
time: those an earlier campaign had emailed or put in its control band are left out of both groups
(an earlier email kept some of them, so they no longer compare like with like).</p>
{_campaign_state(context.campaign)}
</body></html>
"""
    return pages.write_atomically(path, text)


def _check_rows(checks: Sequence[Mapping[str, object]]) -> str:
    """The checks' rows, those not passing first."""
    esc = html.escape
    return "".join(
        f"<tr><td>{esc(str(c['check_name']))}</td><td>{esc(str(c['target']))}</td>"
        f"<td>{esc(str(c['severity']))}</td><td>{'ok' if c['passed'] else 'FAILED'}</td>"
        f"<td>{esc(str(c['expected']))}</td><td>{esc(str(c['found']))}</td></tr>"
        for c in sorted(checks, key=lambda c: (bool(c["passed"]), str(c["check_name"])))
    )


def _figures_html(charts: Sequence[tuple[str, Figure]]) -> str:
    """Each (title, figure) as an embedded PNG with its caption."""
    esc = html.escape
    return "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{plots.png_base64(fig)}">'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for title, fig in charts
    )


def _segment_table(segments: Sequence[Mapping[str, Any]]) -> str:
    """Scores by segment as a table (nothing when there are no segments)."""
    segment_rows = _segment_rows(segments)
    if not segment_rows:
        return ""
    return (
        "<table><tr><th>segment</th><th>value</th><th>rows</th><th>share</th>"
        "<th>mean score</th><th>in the riskiest decile</th></tr>"
        f"{segment_rows}</table>"
    )


def _points(value: object) -> str:
    """A difference of fractions in signed percentage points; a dash where there is none."""
    return f"{100 * value:+.1f}" if isinstance(value, int | float) else "&mdash;"


def _campaign_state(state: Mapping[str, str] | None) -> str:
    """The campaign as an experiment: pooled uplift, power and the targeting policy."""
    if not state:
        return ""
    esc = html.escape
    return (
        "<h2>Campaign experiment</h2>"
        f"<p><b>Pooled over weekly cohorts:</b> {esc(state['pooled'])}.</p>"
        f"<p><b>Power:</b> {esc(state['plan'])}.</p>"
        f"<p><b>Targeting:</b> {esc(state['policy'])}.</p>"
    )


def _uplift_rows(uplift: Sequence[Mapping[str, object]]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(str(u['campaign']))}</td><td>{esc(str(u['score_date']))}</td>"
        f'<td class="num">{esc(str(u["contacted"]))} ({esc(str(u["contacted_positives"]))})</td>'
        f'<td class="num">{esc(str(u["control"]))} ({esc(str(u["control_positives"]))})</td>'
        f'<td class="num">{pages.percent(u["contacted_rate"])}</td>'
        f'<td class="num">{pages.percent(u["control_rate"])}</td>'
        f'<td class="num">{_points(u["uplift"])} '
        f"[{_points(u['ci_low'])}, {_points(u['ci_high'])}]</td></tr>"
        for u in uplift
    )
    return rows or '<tr><td colspan="7" class="note">no campaign has matured yet</td></tr>'


def _hist_figure(tonight: np.ndarray | None, previous: np.ndarray | None) -> Figure:
    fig, ax = plots.new_axes()
    if tonight is None or not np.sum(tonight):
        plots.no_data(ax, "no scores")
        return fig
    edges = np.linspace(0, 1, len(tonight) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    ax.step(
        centers,
        tonight / np.sum(tonight),
        where="mid",
        color=plots.CHALLENGER_COLOUR,
        label="tonight",
    )
    if previous is not None and np.sum(previous):
        ax.step(
            centers,
            previous / np.sum(previous),
            where="mid",
            color=plots.CHAMPION_COLOUR,
            label="previous night",
        )
    ax.set_xlabel("probability")
    ax.set_ylabel("share of the population")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def _drift_figure(drift: Sequence[tuple[str, float, bool]]) -> Figure:
    fig, ax = plots.new_axes()
    top = sorted(drift, key=lambda d: -d[1])[:10]
    if not top:
        plots.no_data(ax, "no drift reference")
        return fig
    names = [d[0] for d in top][::-1]
    values = [d[1] for d in top][::-1]
    colours = [plots.CHALLENGER_COLOUR if d[2] else "#b3261e" for d in top][::-1]
    ax.barh(names, values, color=colours)
    ax.set_xlabel("PSI")
    fig.tight_layout()
    return fig


def _realized_figure(
    realized: Sequence[Mapping[str, object]], decay_threshold: float | None = None
) -> Figure:
    fig, ax = plots.new_axes()
    points = [r for r in realized if r.get("roc_auc") is not None]
    if not points:
        plots.no_data(ax, "no matured nights yet")
        return fig
    dates = sorted({str(r["score_date"]) for r in points})
    for version in sorted({str(r["model_version"]) for r in points}):
        mine = sorted(
            (r for r in points if r["model_version"] == version), key=lambda r: str(r["score_date"])
        )
        (line,) = ax.plot(
            [str(r["score_date"]) for r in mine],
            [float(r["roc_auc"]) for r in mine],  # type: ignore[arg-type]
            marker="o",
            label=plots.legend_label(version),
        )
        known = [r["holdout_auc"] for r in mine if isinstance(r.get("holdout_auc"), int | float)]
        if known:
            holdout = float(known[0])  # type: ignore[arg-type]
            span = [str(mine[0]["score_date"]), str(mine[-1]["score_date"])]
            if span[0] == span[1]:
                span = [dates[0], dates[-1]]
            ax.plot(span, [holdout] * 2, linestyle="--", color=line.get_color(), linewidth=1)
            if decay_threshold is not None:
                floor = holdout - decay_threshold
                ax.plot(span, [floor] * 2, linestyle=":", color=line.get_color(), linewidth=1)
    ax.set_ylabel("realized ROC AUC")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _decile_figure(rates: Mapping[str, float] | None) -> Figure:
    fig, ax = plots.new_axes()
    if not rates:
        plots.no_data(ax, "no matured nights yet")
        return fig
    deciles = sorted(rates, key=int)
    values = np.array([rates[d] for d in deciles])
    base = values.mean() if values.mean() else 1.0
    ax.bar([int(d) for d in deciles], values / base, color=plots.CHALLENGER_COLOUR)
    ax.axhline(1.0, color=plots.REFERENCE_COLOUR, linestyle="--")
    ax.set_xlabel("risk decile (1 = riskiest)")
    ax.set_ylabel("lift")
    fig.tight_layout()
    return fig
