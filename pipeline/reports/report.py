"""Self-contained HTML report of one champion/challenger evaluation.

The report is a single HTML file with no external resources: the plots (ROC, cumulative
gains and lift, calibration) are rendered with matplotlib's Agg renderer to PNG and embedded
as base64 ``data:`` URIs, and the styling is an inline ``<style>`` block. Every string that
comes from the caller is HTML-escaped; the file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.reports import pages
from pipeline.store.ledger import NIGHT_STAGES

if TYPE_CHECKING:
    from pipeline.stages.evaluate import Evaluation

FIG_SIZE = (5.0, 4.0)
FIG_DPI = 90
CALIBRATION_BINS = 10
CURVE_POINTS = 201  # population-fraction grid of the gains / lift curves
MAX_ROC_POINTS = 2000  # ROC vertices kept for drawing

CHALLENGER_COLOUR = "#1f77b4"
CHAMPION_COLOUR = "#ff7f0e"
REFERENCE_COLOUR = "#888888"

DECISION_COLOURS: dict[str, str] = {
    "promote": "#1e7b34",
    "shadow": "#1f5fa8",
    "awaiting_approval": "#b26a00",
    "reject": "#b3261e",
    "identical": "#555555",
    "approved": "#1e7b34",
    "rejected": "#b3261e",
}
UNKNOWN_DECISION_COLOUR = "#555555"

INTEGER_METRICS = frozenset({"rows"})
LOWER_IS_BETTER = frozenset({"brier", "log_loss", "ece"})


def write_evaluation_report(
    path: Path,
    evaluation: Evaluation,
    *,
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray | None,
    card: Mapping[str, Any] | None = None,
    importance: Sequence[Mapping[str, Any]] = (),
    segments: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> Path:
    """Write a self-contained HTML report of one champion/challenger evaluation.

    The report holds a header (use case, model versions, the pooled holdout dates with
    their rows and positives, the decision in a colour keyed by its value, and the
    reasons), three embedded PNG plots (ROC curve, cumulative gains and lift by population
    fraction, calibration over 10 equal-count bins; the champion is drawn whenever
    ``p_champion`` is given), the gate table, a metric table and the paired evidence
    (estimate, 95% interval, probability the challenger is better). It references no
    external resource.

    Args:
        path: Destination of the HTML file. Missing parent folders are created; an existing
            file is replaced atomically (temporary file in the same folder, then
            ``os.replace``), so readers never see a partial report.
        evaluation: What was compared and decided (``pipeline.stages.evaluate.Evaluation``).
        y: 0/1 labels of the holdout rows both models were judged on.
        p_challenger: Challenger probabilities, one per row of ``y``.
        p_champion: Champion probabilities, one per row of ``y``, or ``None``.
        card: The challenger's model card (features, training window and rows, estimator,
            parameters, seed, library and code versions).
        importance: Permutation importance (feature, importance, spread), most important first.
        segments: Segment column to ``evaluate.segment_metrics`` rows.

    Returns:
        ``path``, once the report is in place.

    Raises:
        ValueError: If ``y`` is empty or the probability arrays do not match its length.
    """
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    p_ch = np.asarray(p_challenger, dtype=np.float64).ravel()
    p_cp = None if p_champion is None else np.asarray(p_champion, dtype=np.float64).ravel()
    if y_arr.size == 0:
        raise ValueError("cannot report on an empty holdout")
    if p_ch.shape != y_arr.shape or (p_cp is not None and p_cp.shape != y_arr.shape):
        raise ValueError("probabilities must have one value per holdout row")

    series: list[tuple[str, np.ndarray, str]] = [
        (f"challenger {evaluation.challenger}", p_ch, CHALLENGER_COLOUR)
    ]
    if p_cp is not None:
        series.append((f"champion {evaluation.champion or ''}".rstrip(), p_cp, CHAMPION_COLOUR))

    images = [
        ("ROC curve", _png_base64(_roc_figure(y_arr, series))),
        ("Cumulative gains and lift", _png_base64(_gains_figure(y_arr, series))),
        ("Calibration (10 equal-count bins)", _png_base64(_calibration_figure(y_arr, series))),
    ]
    document = _render_html(
        evaluation,
        y=y_arr,
        images=images,
        extra=_gate_table(evaluation.checks)
        + _card_html(card)
        + _importance_html(importance)
        + _segment_metrics_html(segments or {}),
    )
    return _write_atomically(Path(path), document)


def _num(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&mdash;"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _gate_table(checks: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    if not checks:
        return ""
    rows = "".join(
        f"<tr><td>{esc(str(c.get('check')))}</td>"
        f"<td>{'pass' if c.get('passed') else '<strong>FAIL</strong>'}</td>"
        f"<td>{esc(str(c.get('expected')))}</td><td>{esc(str(c.get('found')))}</td></tr>"
        for c in checks
    )
    return (
        "<h2>Gates</h2><table class='gates'><tr><th>check</th><th>result</th><th>expected</th>"
        f"<th>found</th></tr>{rows}</table>"
    )


def _card_html(card: Mapping[str, Any] | None) -> str:
    if not card:
        return ""
    esc = html.escape
    window = card.get("training_window") or {}
    snapshots = window.get("snapshots") or []
    holdout = window.get("holdout") or {}
    params = card.get("model_params") or {}
    features = card.get("features") or []
    snap_rows = "".join(
        f"<tr><td>{esc(str(s.get('as_of')))}</td><td class='num'>{int(s.get('rows') or 0):,}</td>"
        f"<td><code>{esc(str(s.get('sha256', ''))[:12])}</code></td></tr>"
        for s in snapshots
    )
    param_rows = "".join(
        f"<tr><td>{esc(str(k))}</td><td><code>{esc(str(v))}</code></td></tr>"
        for k, v in sorted(params.items())
    )
    libs = ", ".join(
        f"{esc(k)} {esc(str(v))}" for k, v in (card.get("library_versions") or {}).items()
    )
    feature_list = ", ".join(
        f"<code>{esc(str(f.get('name')))}</code> ({esc(str(f.get('dtype')))})" for f in features
    )
    positive_rate = window.get("positive_rate")
    return f"""<h2>Model card</h2>
<dl class="header">
<dt>version</dt><dd><code>{esc(str(card.get("version", "")))}</code></dd>
<dt>estimator</dt><dd>{esc(str(card.get("estimator", "")))} (seed {esc(str(card.get("seed", "")))})</dd>
<dt>trained as of</dt><dd>{esc(str(card.get("trained_as_of", "")))}</dd>
<dt>training rows</dt><dd>{int(window.get("training_rows") or 0):,}
(positive rate {_percent(positive_rate)}), label horizon {esc(str(window.get("label_horizon_days", "")))} days</dd>
<dt>holdout</dt><dd>as of {esc(str(holdout.get("as_of", "")))}, {int(holdout.get("rows") or 0):,} rows</dd>
<dt>code version</dt><dd><code>{esc(str(card.get("code_version", "")))}</code></dd>
<dt>artifact sha256</dt><dd><code>{esc(str(card.get("sha256", "")))}</code></dd>
<dt>libraries</dt><dd>{libs}</dd>
<dt>features ({len(features)})</dt><dd>{feature_list}</dd>
</dl>
<h3>Training window</h3>
<table><tr><th>snapshot as of</th><th>rows</th><th>sha256</th></tr>{snap_rows}</table>
<h3>Parameters</h3>
<table><tr><th>parameter</th><th>value</th></tr>{param_rows or "<tr><td colspan='2' class='note'>defaults</td></tr>"}</table>
"""


def _importance_html(importance: Sequence[Mapping[str, Any]]) -> str:
    if not importance:
        return ""
    esc = html.escape
    top = max(float(r["importance"]) for r in importance) or 1.0
    rows = "".join(
        f"<tr><td><code>{esc(str(r['feature']))}</code></td>"
        f"<td class='num'>{float(r['importance']):+.4f}</td>"
        f"<td class='num'>&plusmn;{float(r['spread']):.4f}</td>"
        f"<td><div style='background:{CHALLENGER_COLOUR};height:0.8em;"
        f"width:{max(0.0, float(r['importance'])) / top * 200:.0f}px'></div></td></tr>"
        for r in importance
    )
    return (
        "<h2>Feature importance (challenger)</h2><p class='note'>ROC AUC lost when the feature's "
        "values are shuffled (permutation importance on a bounded seeded sample of the "
        "holdout).</p><table><tr><th>feature</th><th>AUC drop</th><th>spread</th><th></th></tr>"
        f"{rows}</table>"
    )


def _segment_metrics_html(segments: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    if not segments:
        return ""
    esc = html.escape
    parts = ["<h2>Metrics by segment (holdout)</h2>"]
    for column, rows in segments.items():
        body = "".join(
            f"<tr><td>{esc(str(r['value']))}</td><td class='num'>{int(r['rows']):,}</td>"
            f"<td class='num'>{int(r['positives']):,}</td><td class='num'>{_percent(r['rate'])}</td>"
            f"<td class='num'>{_num(r['mean_challenger'])}</td>"
            f"<td class='num'>{_num(r['auc_challenger'], 3)}</td>"
            f"<td class='num'>{_num(r['auc_champion'], 3)}</td></tr>"
            for r in rows
        )
        parts.append(
            f"<h3>{esc(column)}</h3><table><tr><th>value</th><th>rows</th><th>positives</th>"
            "<th>observed rate</th><th>mean challenger score</th><th>challenger AUC</th>"
            f"<th>champion AUC</th></tr>{body}</table>"
        )
    return "".join(parts)


# --- plots ---------------------------------------------------------------------------------


def _legend_label(label: str) -> str:
    """A legend label matplotlib shows verbatim (no mathtext, not hidden by a leading '_')."""
    return label.replace("$", r"\$")


def _new_axes() -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#b3261e")


def _roc_figure(y: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]]) -> Figure:
    from sklearn.metrics import auc, roc_curve

    fig, ax = _new_axes()
    ax.plot([0, 1], [0, 1], linestyle="--", color=REFERENCE_COLOUR, linewidth=1, label="random")
    n_pos = int(y.sum())
    if 0 < n_pos < y.size:
        for label, p, colour in series:
            fpr, tpr, _ = roc_curve(y, p)
            area = float(auc(fpr, tpr))
            if fpr.size > MAX_ROC_POINTS:
                keep = np.unique(np.linspace(0, fpr.size - 1, MAX_ROC_POINTS).astype(np.int64))
                fpr, tpr = fpr[keep], tpr[keep]
            ax.plot(
                fpr, tpr, color=colour, linewidth=1.5, label=_legend_label(f"{label} ({area:.3f})")
            )
    else:
        _no_data(ax, "ROC undefined: one class only")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("ROC curve (AUC in legend)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _cumulative_gains(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Share of all positives captured in the top ``grid`` fraction of rows by score."""
    order = np.argsort(-p, kind="mergesort")
    captured = np.concatenate(([0.0], np.cumsum(y[order]))) / y.sum()
    fraction = np.arange(y.size + 1) / y.size
    return np.interp(grid, fraction, captured)


def _gains_figure(y: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]]) -> Figure:
    fig = Figure(figsize=(FIG_SIZE[0] * 1.6, FIG_SIZE[1]), dpi=FIG_DPI)
    ax_gain = fig.add_subplot(1, 2, 1)
    ax_lift = fig.add_subplot(1, 2, 2)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    ax_gain.plot(
        [0, 1], [0, 1], linestyle="--", color=REFERENCE_COLOUR, linewidth=1, label="random"
    )
    ax_lift.axhline(1.0, linestyle="--", color=REFERENCE_COLOUR, linewidth=1, label="random")
    if y.sum() > 0:
        base_rate = float(y.mean())
        ax_gain.plot(
            [0, base_rate, 1],
            [0, 1, 1],
            linestyle=":",
            color=REFERENCE_COLOUR,
            linewidth=1,
            label="perfect",
        )
        for label, p, colour in series:
            gains = _cumulative_gains(y, p, grid)
            ax_gain.plot(grid, gains, color=colour, linewidth=1.5, label=_legend_label(label))
            lift = gains[1:] / grid[1:]
            ax_lift.plot(grid[1:], lift, color=colour, linewidth=1.5, label=_legend_label(label))
        ax_lift.axvline(0.1, color=REFERENCE_COLOUR, linewidth=0.8, linestyle=":")
    else:
        _no_data(ax_gain, "no positives in the holdout")
        _no_data(ax_lift, "no positives in the holdout")
    ax_gain.set_xlim(0, 1)
    ax_gain.set_ylim(0, 1.01)
    ax_gain.set_xlabel("Population fraction (by score, descending)")
    ax_gain.set_ylabel("Share of positives captured")
    ax_gain.set_title("Cumulative gains")
    ax_gain.legend(loc="lower right", fontsize=8)
    ax_lift.set_xlim(0, 1)
    ax_lift.set_ylim(bottom=0)
    ax_lift.set_xlabel("Population fraction (by score, descending)")
    ax_lift.set_ylabel("Cumulative lift")
    ax_lift.set_title("Cumulative lift (dotted: top decile)")
    ax_lift.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def _calibration_bins(
    y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted probability and observed positive rate in equal-count bins by score."""
    order = np.argsort(p, kind="mergesort")
    n = p.size
    bin_of = (np.arange(n) * bins) // n  # same split as np.array_split
    counts = np.bincount(bin_of, minlength=bins).astype(np.float64)
    sum_p = np.bincount(bin_of, weights=p[order], minlength=bins)
    sum_y = np.bincount(bin_of, weights=y[order], minlength=bins)
    filled = counts > 0
    return sum_p[filled] / counts[filled], sum_y[filled] / counts[filled]


def _calibration_figure(y: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]]) -> Figure:
    """Observed rate vs mean predicted probability in equal-count bins, zoomed to where the
    scores are; below, how the scores spread (log counts)."""
    fig = Figure(figsize=(FIG_SIZE[0] * 1.2, FIG_SIZE[1] * 1.4), dpi=FIG_DPI)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.35)
    ax = fig.add_subplot(grid[0])
    ax_hist = fig.add_subplot(grid[1])
    top = 0.0
    for label, p, colour in series:
        mean_p, observed = _calibration_bins(y, p)
        top = max(top, float(mean_p.max()), float(observed.max()))
        ax.plot(
            mean_p,
            observed,
            marker="o",
            markersize=5,
            color=colour,
            linewidth=1.5,
            label=_legend_label(label),
        )
        ax_hist.hist(p, bins=40, range=(0, 1), histtype="step", color=colour, linewidth=1.2)
    limit = min(1.0, max(0.05, top * 1.1))
    ax.plot(
        [0, limit],
        [0, limit],
        linestyle="--",
        color=REFERENCE_COLOUR,
        linewidth=1,
        label="perfectly calibrated",
    )
    ax.grid(True, color="#eeeeee")
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_xlabel("Mean predicted probability (bin of 10% of the holdout)")
    ax.set_ylabel("Observed positive rate")
    ax.set_title("Calibration (above the line: under-predicts)")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.set_xlim(0, limit)
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("Predicted probability")
    ax_hist.set_ylabel("rows")
    return fig


def _png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- HTML ----------------------------------------------------------------------------------


def _format_value(name: str, value: float | None) -> str:
    if value is None:
        return "&mdash;"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if name in INTEGER_METRICS:
        return f"{value:,.0f}"
    return f"{value:.4f}"


def _format_difference(name: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return _format_value(name, value)
    if name in INTEGER_METRICS:
        return f"{value:+,.0f}"
    return f"{value:+.4f}"


def _metric_rows(metrics: Mapping[str, Mapping[str, float] | None]) -> str:
    challenger = metrics.get("challenger") or {}
    champion = metrics.get("champion")
    rows = []
    for name, value in challenger.items():
        other = None if champion is None else champion.get(name)
        diff = None if other is None else float(value) - float(other)
        note = " (lower is better)" if name in LOWER_IS_BETTER else ""
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(name))}{note}</td>"
            f'<td class="num">{_format_value(name, value)}</td>'
            f'<td class="num">{_format_value(name, other)}</td>'
            f'<td class="num">{_format_difference(name, diff)}</td>'
            "</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="4" class="note">no metrics recorded</td></tr>')
    return "\n".join(rows)


def _evidence_value(value: float | None) -> str:
    """A paired difference, to the digit that shows its sign (log-loss gains are small)."""
    if value is None or math.isnan(value):
        return "&mdash;"
    return f"{value:+.5f}"


def _interval_rows(intervals: Mapping[str, Mapping[str, float]]) -> str:
    rows = []
    for name, interval in intervals.items():
        estimate = interval.get("estimate")
        low = interval.get("low")
        high = interval.get("high")
        confidence = interval.get("confidence")
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(name))}</td>"
            f'<td class="num">{_evidence_value(estimate)}</td>'
            f'<td class="num">[{_evidence_value(low)}, {_evidence_value(high)}]</td>'
            f'<td class="num">{"&mdash;" if confidence is None else f"{confidence:.1%}"}</td>'
            "</tr>"
        )
    if not rows:
        rows.append(
            '<tr><td colspan="4" class="note">no champion to compare with, or the same model</td></tr>'
        )
    return "\n".join(rows)


def _holdout_text(evaluation: Evaluation) -> str:
    esc = html.escape
    parts = [
        f"<code>{esc(str(h['as_of']))}</code> ({int(h['rows']):,} rows, "
        f"{int(h['positives']):,} positives"
        + ("" if h.get("compared", True) else "; not out of time for the champion: not compared")
        + ")"
        for h in evaluation.holdouts
    ]
    return ", ".join(parts) or "none"


def _render_html(
    evaluation: Evaluation,
    *,
    y: np.ndarray,
    images: Sequence[tuple[str, str]],
    extra: str = "",
) -> str:
    esc = html.escape
    decision = evaluation.decision
    colour = DECISION_COLOURS.get(decision, UNKNOWN_DECISION_COLOUR)
    champion = evaluation.champion
    champion_html = f"<code>{esc(champion)}</code>" if champion is not None else "none yet"
    positives = int(y.sum())
    reason_items = "\n".join(f"<li>{esc(str(reason))}</li>" for reason in evaluation.reasons)
    if not reason_items:
        reason_items = '<li class="note">no reasons given</li>'
    if evaluation.decayed:
        reason_items += (
            f"\n<li>the champion has decayed ({esc(evaluation.decayed)}): the challenger needed "
            "only not to be shown worse (gates.decayed_promote_confidence)</li>"
        )
    figures = "\n".join(
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for caption, data in images
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report: {esc(evaluation.use_case)} / {esc(evaluation.challenger)}</title>
<style>{pages.STYLE}</style>
</head>
<body>
<h1>Evaluation report: {esc(evaluation.use_case)}</h1>
<p class="meta">Challenger <code>{esc(evaluation.challenger)}</code> &middot; champion {champion_html}
&middot; compared on {y.size:,} rows, {positives:,} positives ({positives / y.size:.2%})</p>
<p class="meta">Holdout dates: {_holdout_text(evaluation)}</p>
<h2>Decision</h2>
<p><span class="decision" style="background: {colour};">{esc(decision)}</span></p>
<ul class="reasons">
{reason_items}
</ul>
<p class="links"><a href="../../">all reports</a></p>
<h2>Plots</h2>
<div class="plots">
{figures}
</div>
{extra}
<h2>Metrics</h2>
<table class="metrics">
<thead><tr><th>Metric</th><th>Challenger</th><th>Champion</th>
<th>Difference (challenger &minus; champion)</th></tr></thead>
<tbody>
{_metric_rows(evaluation.metrics)}
</tbody>
</table>
<h2>Evidence, paired on the same rows (positive favours the challenger)</h2>
<table class="intervals">
<thead><tr><th>Quantity</th><th>Estimate</th><th>95% interval</th>
<th>P(challenger better)</th></tr></thead>
<tbody>
{_interval_rows(evaluation.evidence)}
</tbody>
</table>
</body>
</html>
"""


def _write_atomically(path: Path, text: str) -> Path:
    from pipeline.core import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.sweep(path.parent)
    tmp_name = files.temporary(path)
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o600)  # its owner only, like everything under the home
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


# --- the nightly run report ------------------------------------------------------------------


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
    plots = [
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
    rows = "".join(
        f"<tr><td>{esc(str(c['check_name']))}</td><td>{esc(str(c['target']))}</td>"
        f"<td>{esc(str(c['severity']))}</td><td>{'ok' if c['passed'] else 'FAILED'}</td>"
        f"<td>{esc(str(c['expected']))}</td><td>{esc(str(c['found']))}</td></tr>"
        for c in sorted(checks, key=lambda c: (bool(c["passed"]), str(c["check_name"])))
    )
    figures = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{_png_base64(fig)}">'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for title, fig in plots
    )
    kind, banner = night_banner(score_date, context)
    segment_rows = _segment_rows(context.segments)
    if segment_rows:
        segment_html = (
            "<table><tr><th>segment</th><th>value</th><th>rows</th><th>share</th>"
            "<th>mean score</th><th>in the riskiest decile</th></tr>"
            f"{segment_rows}</table>"
        )
    else:
        segment_html = ""
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
    return _write_atomically(path, text)


def _percent(value: object) -> str:
    """A fraction as a percentage; a dash where there is none (an empty group)."""
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "&mdash;"


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
        f'<td class="num">{_percent(u["contacted_rate"])}</td>'
        f'<td class="num">{_percent(u["control_rate"])}</td>'
        f'<td class="num">{_points(u["uplift"])} '
        f"[{_points(u['ci_low'])}, {_points(u['ci_high'])}]</td></tr>"
        for u in uplift
    )
    return rows or '<tr><td colspan="7" class="note">no campaign has matured yet</td></tr>'


def _hist_figure(tonight: np.ndarray | None, previous: np.ndarray | None) -> Figure:
    fig, ax = _new_axes()
    if tonight is None or not np.sum(tonight):
        _no_data(ax, "no scores")
        return fig
    edges = np.linspace(0, 1, len(tonight) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    ax.step(
        centers, tonight / np.sum(tonight), where="mid", color=CHALLENGER_COLOUR, label="tonight"
    )
    if previous is not None and np.sum(previous):
        ax.step(
            centers,
            previous / np.sum(previous),
            where="mid",
            color=CHAMPION_COLOUR,
            label="previous night",
        )
    ax.set_xlabel("probability")
    ax.set_ylabel("share of the population")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def _drift_figure(drift: Sequence[tuple[str, float, bool]]) -> Figure:
    fig, ax = _new_axes()
    top = sorted(drift, key=lambda d: -d[1])[:10]
    if not top:
        _no_data(ax, "no drift reference")
        return fig
    names = [d[0] for d in top][::-1]
    values = [d[1] for d in top][::-1]
    colours = [CHALLENGER_COLOUR if d[2] else "#b3261e" for d in top][::-1]
    ax.barh(names, values, color=colours)
    ax.set_xlabel("PSI")
    fig.tight_layout()
    return fig


def _realized_figure(
    realized: Sequence[Mapping[str, object]], decay_threshold: float | None = None
) -> Figure:
    fig, ax = _new_axes()
    points = [r for r in realized if r.get("roc_auc") is not None]
    if not points:
        _no_data(ax, "no matured nights yet")
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
            label=_legend_label(version),
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
    fig, ax = _new_axes()
    if not rates:
        _no_data(ax, "no matured nights yet")
        return fig
    deciles = sorted(rates, key=int)
    values = np.array([rates[d] for d in deciles])
    base = values.mean() if values.mean() else 1.0
    ax.bar([int(d) for d in deciles], values / base, color=CHALLENGER_COLOUR)
    ax.axhline(1.0, color=REFERENCE_COLOUR, linestyle="--")
    ax.set_xlabel("risk decile (1 = riskiest)")
    ax.set_ylabel("lift")
    fig.tight_layout()
    return fig
