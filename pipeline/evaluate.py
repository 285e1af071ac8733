"""Model metrics on a labelled snapshot: discrimination, calibration and campaign value.

All functions take plain numpy arrays (labels in {0, 1}, probabilities in [0, 1]).
"""

from __future__ import annotations

import numpy as np


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
