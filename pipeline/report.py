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
from datetime import date
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

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
}
UNKNOWN_DECISION_COLOUR = "#555555"

INTEGER_METRICS = frozenset({"rows"})
LOWER_IS_BETTER = frozenset({"brier", "log_loss", "ece"})

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em;
       color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
.meta code { background: #f3f3f3; padding: 0 0.3em; }
.decision { display: inline-block; padding: 0.4em 1.2em; border-radius: 0.3em; color: #fff;
            font-size: 1.6em; font-weight: bold; letter-spacing: 0.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-family: Menlo, Consolas, monospace; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; }
.plots img { max-width: 100%; border: 1px solid #ddd; }
.plots figcaption { color: #555; font-size: 0.9em; }
.note { color: #777; font-size: 0.9em; }
"""


def write_evaluation_report(
    path: Path,
    *,
    use_case: str,
    challenger: str,
    champion: str | None,
    holdout_as_of: date,
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray | None,
    metrics: dict[str, dict[str, float] | None],
    intervals: dict[str, dict[str, float]],
    decision: str,
    reasons: list[str],
) -> Path:
    """Write a self-contained HTML report of one champion/challenger evaluation.

    The report holds a header (use case, model versions, holdout date, the decision in a
    colour keyed by its value, and the reasons), three embedded PNG plots (ROC curve,
    cumulative gains and lift by population fraction, calibration over 10 equal-count bins;
    the champion is drawn whenever ``p_champion`` is given), a metric table and a table of
    the difference intervals. It references no external resource.

    Args:
        path: Destination of the HTML file. Missing parent folders are created; an existing
            file is replaced atomically (temporary file in the same folder, then
            ``os.replace``), so readers never see a partial report.
        use_case: Name of the use case, shown in the title.
        challenger: Version string of the challenger model.
        champion: Version string of the current champion, or ``None`` when there is none.
        holdout_as_of: Date of the holdout snapshot the models were evaluated on.
        y: 0/1 labels of the holdout rows.
        p_challenger: Challenger probabilities, one per row of ``y``.
        p_champion: Champion probabilities, one per row of ``y``, or ``None``.
        metrics: ``{"challenger": {...}, "champion": {...} or None}``. The metric table has
            one row per key of ``metrics["challenger"]`` (in its order), with the champion
            value and the challenger-minus-champion difference when available.
        intervals: Name to ``{"estimate", "low", "high"}`` (95% interval), e.g.
            ``"roc_auc_diff"``; shown to 4 decimals.
        decision: ``"promote"``, ``"shadow"``, ``"awaiting_approval"`` or ``"reject"``
            (any other value is shown in a neutral colour).
        reasons: Human-readable reasons for the decision, listed under it.

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
        (f"challenger {challenger}", p_ch, CHALLENGER_COLOUR)
    ]
    if p_cp is not None:
        series.append((f"champion {champion or ''}".rstrip(), p_cp, CHAMPION_COLOUR))

    images = [
        ("ROC curve", _png_base64(_roc_figure(y_arr, series))),
        ("Cumulative gains and lift", _png_base64(_gains_figure(y_arr, series))),
        ("Calibration (10 equal-count bins)", _png_base64(_calibration_figure(y_arr, series))),
    ]
    document = _render_html(
        use_case=use_case,
        challenger=challenger,
        champion=champion,
        holdout_as_of=holdout_as_of,
        y=y_arr,
        metrics=metrics,
        intervals=intervals,
        decision=decision,
        reasons=reasons,
        images=images,
    )
    return _write_atomically(Path(path), document)


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
    fig, ax = _new_axes()
    top = 0.0
    for label, p, colour in series:
        mean_p, observed = _calibration_bins(y, p)
        top = max(top, float(mean_p.max()), float(observed.max()))
        ax.plot(
            mean_p,
            observed,
            marker="o",
            markersize=4,
            color=colour,
            linewidth=1.5,
            label=_legend_label(label),
        )
    limit = min(1.0, max(0.05, top * 1.1))
    ax.plot(
        [0, limit],
        [0, limit],
        linestyle="--",
        color=REFERENCE_COLOUR,
        linewidth=1,
        label="perfectly calibrated",
    )
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_xlabel("Mean predicted probability")
    ax.set_ylabel("Observed positive rate")
    ax.set_title("Calibration")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
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


def _interval_rows(intervals: Mapping[str, Mapping[str, float]]) -> str:
    rows = []
    for name, interval in intervals.items():
        estimate = interval.get("estimate")
        low = interval.get("low")
        high = interval.get("high")
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(name))}</td>"
            f'<td class="num">{_format_value(name, estimate)}</td>'
            f'<td class="num">[{_format_value(name, low)}, {_format_value(name, high)}]</td>'
            "</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="3" class="note">no intervals computed</td></tr>')
    return "\n".join(rows)


def _render_html(
    *,
    use_case: str,
    challenger: str,
    champion: str | None,
    holdout_as_of: date,
    y: np.ndarray,
    metrics: Mapping[str, Mapping[str, float] | None],
    intervals: Mapping[str, Mapping[str, float]],
    decision: str,
    reasons: Sequence[str],
    images: Sequence[tuple[str, str]],
) -> str:
    esc = html.escape
    colour = DECISION_COLOURS.get(decision, UNKNOWN_DECISION_COLOUR)
    champion_html = f"<code>{esc(champion)}</code>" if champion is not None else "none yet"
    positives = int(y.sum())
    reason_items = "\n".join(f"<li>{esc(str(reason))}</li>" for reason in reasons)
    if not reason_items:
        reason_items = '<li class="note">no reasons given</li>'
    figures = "\n".join(
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for caption, data in images
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report: {esc(use_case)} / {esc(challenger)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Evaluation report: {esc(use_case)}</h1>
<p class="meta">Challenger <code>{esc(challenger)}</code> &middot; champion {champion_html}
&middot; holdout as of <code>{esc(holdout_as_of.isoformat())}</code>
&middot; {y.size:,} rows, {positives:,} positives ({positives / y.size:.2%})</p>
<h2>Decision</h2>
<p><span class="decision" style="background: {colour};">{esc(decision)}</span></p>
<ul class="reasons">
{reason_items}
</ul>
<h2>Plots</h2>
<div class="plots">
{figures}
</div>
<h2>Metrics</h2>
<table class="metrics">
<thead><tr><th>Metric</th><th>Challenger</th><th>Champion</th>
<th>Difference (challenger &minus; champion)</th></tr></thead>
<tbody>
{_metric_rows(metrics)}
</tbody>
</table>
<h2>Intervals (challenger &minus; champion)</h2>
<table class="intervals">
<thead><tr><th>Quantity</th><th>Estimate</th><th>95% interval</th></tr></thead>
<tbody>
{_interval_rows(intervals)}
</tbody>
</table>
</body>
</html>
"""


def _write_atomically(path: Path, text: str) -> Path:
    from pipeline import files

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
) -> Path:
    """One self-contained HTML page for a night: what was served and how healthy it looked.

    Args:
        score_hist / previous_hist: counts of scores in equal bins over [0, 1], tonight and
            the previous published night.
        drift: (feature, PSI, within limit), any order; the top ten are drawn.
        checks: rows of ``monitoring.checks`` (check_name, target, severity, passed, expected, found).
        realized: rows of ``monitoring.realized_performance`` (score_date, model_version, roc_auc).
        decile_rates: positive rate per risk decile of the newest matured night, if any.
        uplift: rows of ``monitoring.campaign_uplift`` (campaign, score_date, contacted,
            contacted_positives, control, control_positives, contacted_rate, control_rate,
            uplift, ci_low, ci_high), in the order to show; rates are fractions.
    """
    plots = [
        (
            "Score distribution: tonight vs the previous night",
            _hist_figure(score_hist, previous_hist),
        ),
        ("Top drifting features (PSI vs the champion's training data)", _drift_figure(drift)),
        ("Realized ROC AUC over time, by model version", _realized_figure(realized)),
        ("Realized lift by risk decile (newest matured night)", _decile_figure(decile_rates)),
    ]
    failed = [c for c in checks if not c["passed"]]
    rows = "".join(
        f"<tr><td>{html.escape(str(c['check_name']))}</td><td>{html.escape(str(c['target']))}</td>"
        f"<td>{html.escape(str(c['severity']))}</td><td>{'ok' if c['passed'] else 'FAILED'}</td>"
        f"<td>{html.escape(str(c['expected']))}</td><td>{html.escape(str(c['found']))}</td></tr>"
        for c in sorted(checks, key=lambda c: (bool(c["passed"]), str(c["check_name"])))
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{_png_base64(fig)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, fig in plots
    )
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(use_case)} {score_date}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(use_case)}: night of {score_date}</h1>
<p class="meta">served model <code>{html.escape(model_version or "none")}</code>;
{len(checks)} checks, {len(failed)} not passing</p>
<div class="plots">{figures}</div>
<h2>Checks</h2>
<table><tr><th>check</th><th>target</th><th>severity</th><th>result</th><th>expected</th><th>found</th></tr>
{rows}</table>
<h2>Campaign uplift (once labels matured)</h2>
<table><tr><th>campaign</th><th>score date</th><th>contacted (positive)</th><th>control (positive)</th>
<th>contacted outcome rate</th><th>control outcome rate</th><th>uplift, pp [95% CI]</th></tr>
{_uplift_rows(uplift)}</table>
<p class="note">uplift = control outcome rate &minus; contacted outcome rate: outcomes prevented per
contacted entity, in percentage points.</p>
</body></html>
"""
    return _write_atomically(path, text)


def _percent(value: object) -> str:
    """A fraction as a percentage; a dash where there is none (an empty group)."""
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "&mdash;"


def _points(value: object) -> str:
    """A difference of fractions in signed percentage points; a dash where there is none."""
    return f"{100 * value:+.1f}" if isinstance(value, int | float) else "&mdash;"


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


def _realized_figure(realized: Sequence[Mapping[str, object]]) -> Figure:
    fig, ax = _new_axes()
    points = [r for r in realized if r.get("roc_auc") is not None]
    if not points:
        _no_data(ax, "no matured nights yet")
        return fig
    for version in sorted({str(r["model_version"]) for r in points}):
        mine = sorted(
            (r for r in points if r["model_version"] == version), key=lambda r: str(r["score_date"])
        )
        ax.plot(
            [str(r["score_date"]) for r in mine],
            [float(r["roc_auc"]) for r in mine],  # type: ignore[arg-type]
            marker="o",
            label=_legend_label(version),
        )
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
