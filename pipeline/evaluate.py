"""Model metrics on a labelled snapshot: discrimination, calibration and campaign value.

All functions take plain numpy arrays (labels in {0, 1}, probabilities in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC via the rank-sum formula (ties get average ranks). NaN if one class only."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def top_fraction_mask(p: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``fraction`` highest-scored rows (at least one row)."""
    k = max(1, round(len(p) * fraction))
    idx = np.argsort(-np.asarray(p), kind="mergesort")[:k]
    mask = np.zeros(len(p), dtype=bool)
    mask[idx] = True
    return mask


def lift(y: np.ndarray, p: np.ndarray, fraction: float = 0.1) -> float:
    """Positive rate among the top ``fraction`` by score over the overall positive rate."""
    y = np.asarray(y, dtype=np.float64)
    base = y.mean() if len(y) else float("nan")
    if not base:
        return float("nan")
    return float(y[top_fraction_mask(p, fraction)].mean() / base)


def precision_at(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Positive rate among the ``k`` highest-scored rows."""
    k = max(1, min(k, len(p)))
    idx = np.argsort(-np.asarray(p), kind="mergesort")[:k]
    return float(np.asarray(y, dtype=np.float64)[idx].mean())


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |observed rate - mean probability| over equal-count bins."""
    order = np.argsort(p, kind="mergesort")
    y_sorted = np.asarray(y, dtype=np.float64)[order]
    p_sorted = np.asarray(p, dtype=np.float64)[order]
    total = 0.0
    for part_y, part_p in zip(
        np.array_split(y_sorted, bins), np.array_split(p_sorted, bins), strict=True
    ):
        if len(part_y):
            total += len(part_y) * abs(part_y.mean() - part_p.mean())
    return float(total / max(len(p), 1))


def classification_metrics(
    y: np.ndarray, p: np.ndarray, capacity: int | None = None
) -> dict[str, float]:
    """The metric set recorded for every model on every holdout."""
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss

    y = np.asarray(y, dtype=np.int64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    out = {
        "rows": float(len(y)),
        "positive_rate": float(y.mean()) if len(y) else float("nan"),
        "roc_auc": roc_auc(y, p),
        "pr_auc": float(average_precision_score(y, p)) if 0 < y.sum() < len(y) else float("nan"),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p),
        "lift_top_decile": lift(y, p, 0.1),
        "precision_top_decile": float(y[top_fraction_mask(p, 0.1)].mean())
        if len(y)
        else float("nan"),
    }
    if capacity:
        out["precision_at_capacity"] = precision_at(y, p, capacity)
        out["lift_at_capacity"] = (
            out["precision_at_capacity"] / out["positive_rate"]
            if out["positive_rate"]
            else float("nan")
        )
    return out


def _weighted_auc(
    y: np.ndarray, order: np.ndarray, groups: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """AUC for each row of bootstrap weights ``w`` (B x n), scores pre-sorted by ``order``.

    ``groups`` labels runs of tied scores in sorted order; ties count one half.
    """
    ys = y[order]
    ws = w[:, order]
    pos = ws * ys
    neg = ws * (1 - ys)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    pos_g = np.add.reduceat(pos, starts, axis=1)
    neg_g = np.add.reduceat(neg, starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    num = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
    den = pos_g.sum(axis=1) * neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(num / den, dtype=np.float64)


def _weighted_lift(
    y: np.ndarray, order_desc: np.ndarray, w: np.ndarray, fraction: float
) -> np.ndarray:
    """Top-``fraction`` lift for each row of weights: the highest scores holding that share of weight."""
    ys = y[order_desc]
    ws = w[:, order_desc]
    total = ws.sum(axis=1, keepdims=True)
    inside = (np.cumsum(ws, axis=1) - ws) < fraction * total
    top_rate = (ws * ys * inside).sum(axis=1) / (ws * inside).sum(axis=1)
    base = (ws * ys).sum(axis=1) / total[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(top_rate / base, dtype=np.float64)


# What becomes of a challenger that passes its gates, per promotion mode (models and
# uplift policies alike); one that fails them is rejected.
DECISIONS = {"auto": "promote", "approval": "awaiting_approval", "never": "shadow"}

BOOTSTRAP_ROWS = 50_000  # holdout rows the paired bootstrap resamples, at most (~12 s)


def paired_bootstrap(
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    block: int = 50,
    max_rows: int = BOOTSTRAP_ROWS,
) -> dict[str, dict[str, float]]:
    """95% intervals of challenger-minus-champion AUC and top-decile lift, paired.

    Both models are scored on the same resampled rows (multinomial resampling expressed as
    per-row counts), so the interval reflects the difference, not two independent noises.
    Vectorized over blocks of resamples; seeded, so the same inputs give the same interval.
    A holdout above ``max_rows`` is resampled from a seeded sample of ``m`` = ``max_rows``
    of its ``n`` rows, so the cost stays bounded whatever the population: the m-out-of-n
    bootstrap, whose deviations from the sample's own estimate are scaled by sqrt(m / n)
    around the whole holdout's estimate (both differences are root-n statistics).
    """
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    points = {
        "roc_auc_diff": roc_auc(y, p_challenger) - roc_auc(y, p_champion),
        "lift_top_decile_diff": lift(y, p_challenger) - lift(y, p_champion),
    }
    centres, scale = points, 1.0
    if len(y) > max_rows:
        scale = float(np.sqrt(max_rows / len(y)))
        keep = np.sort(rng.choice(len(y), size=max_rows, replace=False))
        y = y[keep]
        p_challenger, p_champion = np.asarray(p_challenger)[keep], np.asarray(p_champion)[keep]
        centres = {
            "roc_auc_diff": roc_auc(y, p_challenger) - roc_auc(y, p_champion),
            "lift_top_decile_diff": lift(y, p_challenger) - lift(y, p_champion),
        }
    n = len(y)
    models = []
    for p in (np.asarray(p_challenger, dtype=np.float64), np.asarray(p_champion, dtype=np.float64)):
        order = np.argsort(p, kind="mergesort")
        groups = np.unique(p[order], return_inverse=True)[1]
        models.append((order, groups, np.argsort(-p, kind="mergesort")))
    auc_diff: list[np.ndarray] = []
    lift_diff: list[np.ndarray] = []
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        w = (
            np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n)
            .reshape(b, n)
            .astype(np.float64)
        )
        aucs = [_weighted_auc(y, o, g, w) for o, g, _ in models]
        lifts = [_weighted_lift(y, d, w, 0.1) for _, _, d in models]
        auc_diff.append(aucs[0] - aucs[1])
        lift_diff.append(lifts[0] - lifts[1])
        done += b
    out = {}
    for name, draws in (
        ("roc_auc_diff", np.concatenate(auc_diff)),
        ("lift_top_decile_diff", np.concatenate(lift_diff)),
    ):
        low, high = points[name] + (np.nanpercentile(draws, [2.5, 97.5]) - centres[name]) * scale
        out[name] = {
            "estimate": float(points[name]),
            "low": float(low),
            "high": float(high),
            "resamples": float(len(draws)),
            "rows": float(n),
        }
    return out


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected`` (quantile bins of expected).

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    expected = expected[~np.isnan(expected)]
    actual = actual[~np.isnan(actual)]
    if not len(expected) or not len(actual):
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(
        expected
    )
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(
        actual
    )
    e = np.clip(e, 1e-4, None)
    a = np.clip(a, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))


def gate_checks(
    *,
    auc_floor: float,
    lift_floor: float,
    noninferiority_margin: float,
    score_psi_limit: float,
    challenger: dict[str, float],
    p_challenger: np.ndarray,
    champion: dict[str, float] | None = None,
    p_champion: np.ndarray | None = None,
    intervals: dict[str, dict[str, float]] | None = None,
    schema_problems: list[str] | None = None,
    min_holdout_positives: int = 1,
) -> list[dict[str, object]]:
    """Every promotion check, passed or not, with what was expected and what was found.

    Evidence (the holdout holds at least ``min_holdout_positives`` positives: fewer make
    every interval too wide to decide on), sanity (no NaN, not constant, schema compatible
    with tonight's scoring data, score distribution close to the champion's), absolute
    floors, and non-inferiority: the lower bound of the paired-bootstrap AUC difference
    must be >= -margin. Without a champion only evidence, sanity and floors apply.
    """
    p = np.asarray(p_challenger, dtype=np.float64)
    checks: list[dict[str, object]] = []

    def add(name: str, passed: bool, expected: str, found: str) -> None:
        checks.append({"check": name, "passed": bool(passed), "expected": expected, "found": found})

    positives = round(challenger.get("rows", 0.0) * challenger.get("positive_rate", 0.0))
    add(
        "holdout_positives",
        positives >= min_holdout_positives,
        f">= {min_holdout_positives} positives in the out-of-time holdout "
        "(gates.min_holdout_positives)",
        f"{positives} of {int(challenger.get('rows', 0))} rows",
    )

    nans = int(np.isnan(p).sum())
    add("no_nan_scores", nans == 0, "0 NaN scores", f"{nans} NaN scores")
    spread = float(np.nanstd(p)) if len(p) else 0.0
    add("scores_not_constant", spread > 1e-6, "score std > 1e-6", f"std {spread:.3g}")
    problems = schema_problems or []
    add(
        "feature_schema_compatible",
        not problems,
        "scoring data has every model feature, same types",
        "; ".join(problems) or "compatible",
    )
    auc = challenger.get("roc_auc", float("nan"))
    add("auc_floor", bool(auc >= auc_floor), f"ROC AUC >= {auc_floor:.2f}", f"{auc:.4f}")
    lift_value = challenger.get("lift_top_decile", float("nan"))
    add(
        "lift_floor",
        bool(lift_value >= lift_floor),
        f"top-decile lift >= {lift_floor:.2f}",
        f"{lift_value:.2f}",
    )
    if champion is not None and p_champion is not None and intervals:
        shift = psi(p_champion, p)
        add(
            "score_psi_vs_champion",
            bool(shift <= score_psi_limit),
            f"PSI <= {score_psi_limit:.2f}",
            f"{shift:.3f}",
        )
        ci = intervals["roc_auc_diff"]
        passed = bool(ci["low"] >= -noninferiority_margin)
        found = f"{ci['estimate']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"
        if not passed and ci["estimate"] >= 0:
            found += (
                f": higher AUC, but with {positives} holdout positives the interval is too "
                "wide to rule out a loss beyond the margin"
            )
        add(
            "auc_noninferiority",
            passed,
            f"lower 95% bound of AUC(challenger) - AUC(champion) >= -{noninferiority_margin}",
            found,
        )
    return checks


def describe(check: dict[str, object]) -> str:
    """One line for logs and the evaluation record."""
    verdict = "pass" if check["passed"] else "FAIL"
    return f"{verdict} {check['check']}: expected {check['expected']}, found {check['found']}"


def agreement(p_champion: np.ndarray, p_shadow: np.ndarray, capacity: int) -> dict[str, float]:
    """How differently two models rank the same customers (rows aligned by key).

    Spearman rank correlation; share of the champion's top decile also in the shadow's;
    and, for a campaign of ``capacity`` customers, how many would enter or leave it if the
    shadow model were served.
    """
    from scipy.stats import spearmanr

    a = np.asarray(p_champion, dtype=np.float64)
    b = np.asarray(p_shadow, dtype=np.float64)
    top_a, top_b = top_fraction_mask(a, 0.1), top_fraction_mask(b, 0.1)
    k = max(1, min(capacity, len(a)))
    aud_a = np.zeros(len(a), dtype=bool)
    aud_b = np.zeros(len(b), dtype=bool)
    aud_a[np.argsort(-a, kind="mergesort")[:k]] = True
    aud_b[np.argsort(-b, kind="mergesort")[:k]] = True
    return {
        "rows": float(len(a)),
        "spearman": float(spearmanr(a, b).statistic) if len(a) > 1 else float("nan"),
        "top_decile_overlap": float((top_a & top_b).sum() / max(top_a.sum(), 1)),
        "audience_capacity": float(k),
        "audience_enter": float((aud_b & ~aud_a).sum()),
        "audience_leave": float((aud_a & ~aud_b).sum()),
    }


IMPORTANCE_ROWS = 4000  # holdout rows the permutation importance is computed on, at most
IMPORTANCE_REPEATS = 2


def permutation_importance(
    predict: Callable[[pd.DataFrame], np.ndarray],
    frame: pd.DataFrame,
    y: np.ndarray,
    *,
    seed: int,
    rows: int = IMPORTANCE_ROWS,
    repeats: int = IMPORTANCE_REPEATS,
) -> list[dict[str, float | str]]:
    """ROC AUC lost when each feature's values are shuffled, on a bounded seeded sample.

    Cost: ``len(columns) * repeats`` predictions of at most ``rows`` rows. Returns one
    ``{"feature", "importance", "spread"}`` per column (mean and standard deviation of the
    AUC drop over the repeats), most important first; empty when the sample has one class.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    if len(y) > rows:
        keep = np.sort(rng.choice(len(y), size=rows, replace=False))
        frame, y = frame.iloc[keep].reset_index(drop=True), y[keep]
    if y.min() == y.max():
        return []
    base = roc_auc(y, predict(frame))
    out: list[dict[str, float | str]] = []
    for column in frame.columns:  # one prediction per feature and repeat, not per row
        drops = []
        for _ in range(repeats):
            shuffled = frame.copy()
            shuffled[column] = frame[column].to_numpy()[rng.permutation(len(frame))]
            drops.append(base - roc_auc(y, predict(shuffled)))
        out.append(
            {
                "feature": str(column),
                "importance": float(np.mean(drops)),
                "spread": float(np.std(drops)),
            }
        )
    return sorted(out, key=lambda r: -float(r["importance"]))


SEGMENT_VALUES = 20  # most frequent values of a segment column reported, at most


def segment_metrics(
    values: np.ndarray,
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray | None = None,
    top: int = SEGMENT_VALUES,
) -> list[dict[str, float | str | None]]:
    """Per value of a segment column (its ``top`` most frequent): rows, positives, observed
    rate, mean challenger score and each model's ROC AUC (None with one class)."""
    labels = np.asarray(values).astype(str)
    y = np.asarray(y, dtype=np.float64)
    uniques, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    out: list[dict[str, float | str | None]] = []
    for index in np.argsort(-counts, kind="mergesort")[:top]:
        mask = inverse == index
        ys = y[mask]
        both = 0 < ys.sum() < len(ys)
        out.append(
            {
                "value": str(uniques[index]),
                "rows": float(mask.sum()),
                "positives": float(ys.sum()),
                "rate": float(ys.mean()),
                "mean_challenger": float(np.mean(p_challenger[mask])),
                "auc_challenger": roc_auc(ys, p_challenger[mask]) if both else None,
                "auc_champion": (
                    roc_auc(ys, p_champion[mask]) if both and p_champion is not None else None
                ),
            }
        )
    return out
