"""Self-contained HTML report of one champion/challenger evaluation.

The report is a single HTML file with no external resources: the plots (ROC, cumulative
gains and lift, calibration) are rendered with matplotlib's Agg renderer to PNG and embedded
as base64 ``data:`` URIs, and the styling is an inline ``<style>`` block. Every string that
comes from the caller is HTML-escaped; the file is written atomically.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.reports import pages, plots

if TYPE_CHECKING:
    from pipeline.stages.evaluate import Evaluation

CALIBRATION_BINS = 10
CURVE_POINTS = 201  # population-fraction grid of the gains / lift curves
MAX_ROC_POINTS = 2000  # ROC vertices kept for drawing

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
        (f"challenger {evaluation.challenger}", p_ch, plots.CHALLENGER_COLOUR)
    ]
    if p_cp is not None:
        series.append(
            (f"champion {evaluation.champion or ''}".rstrip(), p_cp, plots.CHAMPION_COLOUR)
        )

    images = [
        ("ROC curve", plots.png_base64(_roc_figure(y_arr, series))),
        ("Cumulative gains and lift", plots.png_base64(_gains_figure(y_arr, series))),
        ("Calibration (10 equal-count bins)", plots.png_base64(_calibration_figure(y_arr, series))),
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
    return pages.write_atomically(Path(path), document)


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
(positive rate {pages.percent(positive_rate)}), label horizon {esc(str(window.get("label_horizon_days", "")))} days</dd>
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
        f"<td><div style='background:{plots.CHALLENGER_COLOUR};height:0.8em;"
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
            f"<td class='num'>{int(r['positives']):,}</td><td class='num'>{pages.percent(r['rate'])}</td>"
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


def _roc_figure(y: np.ndarray, series: Sequence[tuple[str, np.ndarray, str]]) -> Figure:
    from sklearn.metrics import auc, roc_curve

    fig, ax = plots.new_axes()
    ax.plot(
        [0, 1], [0, 1], linestyle="--", color=plots.REFERENCE_COLOUR, linewidth=1, label="random"
    )
    n_pos = int(y.sum())
    if 0 < n_pos < y.size:
        for label, p, colour in series:
            fpr, tpr, _ = roc_curve(y, p)
            area = float(auc(fpr, tpr))
            if fpr.size > MAX_ROC_POINTS:
                keep = np.unique(np.linspace(0, fpr.size - 1, MAX_ROC_POINTS).astype(np.int64))
                fpr, tpr = fpr[keep], tpr[keep]
            ax.plot(
                fpr,
                tpr,
                color=colour,
                linewidth=1.5,
                label=plots.legend_label(f"{label} ({area:.3f})"),
            )
    else:
        plots.no_data(ax, "ROC undefined: one class only")
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
    fig = Figure(figsize=(plots.FIG_SIZE[0] * 1.6, plots.FIG_SIZE[1]), dpi=plots.FIG_DPI)
    ax_gain = fig.add_subplot(1, 2, 1)
    ax_lift = fig.add_subplot(1, 2, 2)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    ax_gain.plot(
        [0, 1], [0, 1], linestyle="--", color=plots.REFERENCE_COLOUR, linewidth=1, label="random"
    )
    ax_lift.axhline(1.0, linestyle="--", color=plots.REFERENCE_COLOUR, linewidth=1, label="random")
    if y.sum() > 0:
        base_rate = float(y.mean())
        ax_gain.plot(
            [0, base_rate, 1],
            [0, 1, 1],
            linestyle=":",
            color=plots.REFERENCE_COLOUR,
            linewidth=1,
            label="perfect",
        )
        for label, p, colour in series:
            gains = _cumulative_gains(y, p, grid)
            ax_gain.plot(grid, gains, color=colour, linewidth=1.5, label=plots.legend_label(label))
            lift = gains[1:] / grid[1:]
            ax_lift.plot(
                grid[1:], lift, color=colour, linewidth=1.5, label=plots.legend_label(label)
            )
        ax_lift.axvline(0.1, color=plots.REFERENCE_COLOUR, linewidth=0.8, linestyle=":")
    else:
        plots.no_data(ax_gain, "no positives in the holdout")
        plots.no_data(ax_lift, "no positives in the holdout")
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
    fig = Figure(figsize=(plots.FIG_SIZE[0] * 1.2, plots.FIG_SIZE[1] * 1.4), dpi=plots.FIG_DPI)
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
            label=plots.legend_label(label),
        )
        ax_hist.hist(p, bins=40, range=(0, 1), histtype="step", color=colour, linewidth=1.2)
    limit = min(1.0, max(0.05, top * 1.1))
    ax.plot(
        [0, limit],
        [0, limit],
        linestyle="--",
        color=plots.REFERENCE_COLOUR,
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
