"""Model metrics on a labelled snapshot: discrimination, calibration and campaign value.

All functions take plain numpy arrays (labels in {0, 1}, probabilities in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.figures import beside

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.conf.sections import Gates


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
    """The metric set recorded for every model on every holdout.

    One sort of the scores serves every ranking metric (ROC AUC and average precision
    with ties grouped, the top decile, the top ``capacity``); probabilities are clipped to
    [1e-7, 1 - 1e-7] first, as for the log loss.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    n = len(y)
    nan = float("nan")
    positives = float(y.sum())
    rate = positives / n if n else nan
    desc = np.argsort(-p, kind="mergesort")
    ys, ps = y[desc], p[desc]
    out = {
        "rows": float(n),
        "positive_rate": rate,
        "roc_auc": nan,
        "pr_auc": nan,
        "brier": float(np.mean((y - p) ** 2)) if n else nan,
        "log_loss": float(np.mean(log_loss_rows(y, p))) if n else nan,
        "ece": expected_calibration_error(ys[::-1], ps[::-1]) if n else nan,
        "lift_top_decile": nan,
        "precision_top_decile": nan,
    }
    if 0 < positives < n:
        last = np.r_[ps[1:] != ps[:-1], True]  # the last row of each run of tied scores
        tp = np.cumsum(ys)[last]
        fp = np.cumsum(1 - ys)[last]
        pos_g, neg_g = np.diff(tp, prepend=0.0), np.diff(fp, prepend=0.0)
        negatives = n - positives
        # a positive beats every negative scored below it, and half of those tied with it
        out["roc_auc"] = float(
            np.sum(pos_g * (negatives - fp + 0.5 * neg_g)) / (positives * negatives)
        )
        out["pr_auc"] = float(np.sum(pos_g / positives * tp / (tp + fp)))
    if n:
        top = ys[: max(1, round(n * 0.1))]
        out["precision_top_decile"] = float(top.mean())
        out["lift_top_decile"] = float(top.mean() / rate) if rate else nan
    if capacity:
        out["precision_at_capacity"] = float(ys[: max(1, min(capacity, n))].mean()) if n else nan
        out["lift_at_capacity"] = out["precision_at_capacity"] / rate if rate else nan
    return out


# What becomes of a challenger that passes its gates, per promotion mode (models and
# uplift policies alike); one that fails them is rejected.
DECISIONS = {"auto": "promote", "approval": "awaiting_approval", "never": "shadow"}

Z95 = 1.959963984540054  # two-sided 95%
Z95_ONE_SIDED = 1.6448536269514722


def log_loss_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each row's log loss (probabilities clipped to [1e-7, 1 - 1e-7], as ``log_loss``)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _auc_influence(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """ROC AUC and each row's influence on it (DeLong's placement values, centred and
    scaled): ``(V10 - AUC) / m`` for the m positives, ``(V01 - AUC) / n`` for the n
    negatives, where V10 is the share of negatives a positive outscores and V01 the share
    of positives that outscore a negative (ties count one half). The AUC's variance is
    the sum of their squares, or of the squares of their sums per entity."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    m, n = len(pos), len(neg)
    if not m or not n:
        return float("nan"), np.zeros(len(p))
    below = np.searchsorted(neg, p, "left")
    v10 = (below + 0.5 * (np.searchsorted(neg, p, "right") - below)) / n
    above = m - np.searchsorted(pos, p, "right")
    v01 = (above + 0.5 * (m - np.searchsorted(pos, p, "left") - above)) / m
    auc = float(v10[y].mean())
    return auc, np.where(y, (v10 - auc) / m, (v01 - auc) / n)


def _standard_error(influence: np.ndarray, groups: np.ndarray | None) -> float:
    """The standard error of a statistic from its rows' influences: rows of one entity
    (pooled holdout dates) are summed first, so an entity counts once, not once per date."""
    if groups is None:
        return float(np.sqrt(np.sum(influence**2)))
    sums = np.bincount(groups, weights=influence)
    clusters = len(sums)
    return float(np.sqrt(np.sum(sums**2) * clusters / max(clusters - 1, 1)))


def _estimate(value: float, se: float, rows: int, entities: int) -> dict[str, float]:
    if se > 0:
        confidence = float(NormalDist().cdf(value / se))
    else:  # identical scores on every row: no evidence either way
        confidence = 0.5 if value == 0 else float(value > 0)
    return {
        "estimate": float(value),
        "se": float(se),
        "low": float(value - Z95 * se),
        "high": float(value + Z95 * se),
        "confidence": confidence,
        "rows": float(rows),
        "entities": float(entities),
    }


def paired_evidence(
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray,
    entity: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """How much better the challenger is than the champion on the same labelled rows.

    Three paired differences, each oriented so that a positive value favours the
    challenger: ``roc_auc_diff`` (ranking; DeLong's variance), ``log_loss_gain`` (the
    champion's mean log loss minus the challenger's: a proper scoring rule, which sees
    calibration as well as ranking) and ``brier_gain`` (the same for the Brier score).
    Each has its estimate, standard error, 95% interval (``low``, ``high``) and
    ``confidence``: the probability that the challenger is the better one, Phi(estimate /
    se), a normal approximation with a flat prior.

    Rows are paired (both models score every row), so what the two models share cancels.
    ``entity`` (one key per row) marks rows of the same entity on several pooled holdout
    dates: their influences are summed before squaring (a cluster-robust variance), so
    pooling dates never counts one entity's outcome as independent evidence twice.
    Closed form, O(n log n): the same inputs give the same figures.
    """
    y = np.asarray(y, dtype=np.float64)
    p_ch = np.asarray(p_challenger, dtype=np.float64)
    p_cm = np.asarray(p_champion, dtype=np.float64)
    groups = None if entity is None else np.unique(np.asarray(entity), return_inverse=True)[1]
    rows = len(y)
    entities = rows if groups is None else int(groups.max()) + 1 if rows else 0
    auc_ch, inf_ch = _auc_influence(y, p_ch)
    auc_cm, inf_cm = _auc_influence(y, p_cm)
    out = {
        "roc_auc_diff": _estimate(
            auc_ch - auc_cm, _standard_error(inf_ch - inf_cm, groups), rows, entities
        )
    }
    for name, loss in (
        ("log_loss_gain", log_loss_rows),
        ("brier_gain", lambda t, p: (t - p) ** 2),
    ):
        gain = loss(y, p_cm) - loss(y, p_ch)
        mean = float(gain.mean()) if rows else float("nan")
        out[name] = _estimate(
            mean, _standard_error((gain - mean) / max(rows, 1), groups), rows, entities
        )
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


TOP_DECILE_SHARE_LIMIT = 0.2  # rows at or above the top decile's cut-off, at most


def gate_checks(
    gates: Gates,
    *,
    challenger: dict[str, float],
    p_challenger: np.ndarray,
    champion: dict[str, float] | None = None,
    p_champion: np.ndarray | None = None,
    evidence: dict[str, dict[str, float]] | None = None,
    schema_problems: list[str] | None = None,
    decayed: str | None = None,
    holdout_dates: int = 1,
) -> list[dict[str, object]]:
    """Every promotion check, passed or not, with the config key that governs it, what
    was expected and what was found (figures printed to the digit that decides).

    Evidence (the pooled holdout holds ``gates.min_holdout_positives``), sanity (no NaN,
    not constant, a distinct riskiest decile, the schema of tonight's scoring data),
    absolute floors, and, against a champion (``evidence`` from :func:`paired_evidence`):

    - ``better_than_champion``: the challenger's log loss is lower with probability at
      least ``gates.promote_confidence``; when the champion has ``decayed`` (monitoring
      saw its realized performance or calibration fall past its limits), the burden
      flips: the challenger passes unless the champion is shown better, i.e. with
      probability ``gates.decayed_promote_confidence`` or more;
    - ``auc_not_worse``: the challenger's ranking is not shown worse beyond
      ``gates.noninferiority_margin`` (upper one-sided 95% bound of the AUC difference);
    - ``score_shift_vs_champion``: a score distribution far from the champion's (PSI
      above ``gates.score_psi_limit``) is accepted when the challenger is better
      calibrated on the holdout (lower Brier score and calibration error): a shift that
      fixes calibration is not a fault. ``score_psi_limit: null`` turns the check off.

    The defaults and their error rates at each holdout size: ``benchmarks/gates.py``.
    """
    p = np.asarray(p_challenger, dtype=np.float64)
    rows = int(challenger.get("rows", 0))
    positives = round(rows * challenger.get("positive_rate", 0.0))
    dates = f" over {holdout_dates} holdout dates" if holdout_dates > 1 else ""
    checks = [
        _check(
            "holdout_positives",
            positives >= gates.min_holdout_positives,
            f">= {gates.min_holdout_positives} positives in the out-of-time holdout "
            "(gates.min_holdout_positives)",
            f"{positives} positives in {rows} rows{dates}",
        ),
        *_sanity_checks(p, schema_problems or []),
        *_floor_checks(gates, challenger),
    ]
    if champion is None or p_champion is None or not evidence:
        return checks
    return [
        *checks,
        _better_than_champion(gates, evidence["log_loss_gain"], decayed, positives, dates),
        _auc_not_worse(gates, evidence["roc_auc_diff"]),
        *_score_shift(gates, challenger, champion, p_champion, p),
    ]


def _check(name: str, passed: bool, expected: str, found: str) -> dict[str, object]:
    return {"check": name, "passed": bool(passed), "expected": expected, "found": found}


def _sanity_checks(p: np.ndarray, problems: list[str]) -> list[dict[str, object]]:
    """No NaN, not constant, a distinct riskiest decile, the scoring data's schema."""
    nans = int(np.isnan(p).sum())
    spread = float(np.nanstd(p)) if len(p) else 0.0
    checks = [
        _check("no_nan_scores", nans == 0, "0 NaN scores", f"{nans} NaN scores"),
        _check("scores_not_constant", spread > 1e-6, "score std > 1e-6", f"std {spread:.3g}"),
    ]
    if len(p) and not nans:
        cut = np.quantile(p, 0.9)
        share = float(np.mean(p >= cut))
        checks.append(
            _check(
                "top_decile_distinct",
                share <= TOP_DECILE_SHARE_LIMIT,
                f"<= {TOP_DECILE_SHARE_LIMIT:.0%} of rows score at or above the top decile's "
                "cut-off (ties must not swallow the riskiest decile)",
                f"{share:.1%} at or above {cut:.4g}",
            )
        )
    checks.append(
        _check(
            "feature_schema_compatible",
            not problems,
            "scoring data has every model feature, same types",
            "; ".join(problems) or "compatible",
        )
    )
    return checks


def _floor_checks(gates: Gates, challenger: dict[str, float]) -> list[dict[str, object]]:
    """The challenger's ROC AUC and top-decile lift against their absolute floors."""
    auc = challenger.get("roc_auc", float("nan"))
    lift_value = challenger.get("lift_top_decile", float("nan"))
    return [
        _check(
            "auc_floor",
            bool(auc >= gates.auc_floor),
            f"ROC AUC >= {gates.auc_floor:g} (gates.auc_floor)",
            beside(auc, gates.auc_floor, 4),
        ),
        _check(
            "lift_floor",
            bool(lift_value >= gates.lift_floor),
            f"top-decile lift >= {gates.lift_floor:g} (gates.lift_floor)",
            beside(lift_value, gates.lift_floor, 2),
        ),
    ]


def _better_than_champion(
    gates: Gates, gain: dict[str, float], decayed: str | None, positives: int, dates: str
) -> dict[str, object]:
    """The challenger's log loss lower with the confidence the gates ask (the champion's,
    when it has decayed)."""
    if decayed:
        need, key = gates.decayed_promote_confidence, "gates.decayed_promote_confidence"
        why = f"; the champion has decayed ({decayed}): it must be shown better to stay"
    else:
        need, key, why = gates.promote_confidence, "gates.promote_confidence", ""
    return _check(
        "better_than_champion",
        gain["confidence"] >= need,
        f"P(challenger's log loss is lower) >= {need:.1%} ({key}){why}",
        f"{beside(100 * gain['confidence'], 100 * need, 1)}%: log-loss gain "
        f"{gain['estimate']:+.5f} (95% CI {gain['low']:+.5f} .. {gain['high']:+.5f}) on "
        f"{positives} positives, {int(gain['entities'])} entities{dates}",
    )


def _auc_not_worse(gates: Gates, auc_diff: dict[str, float]) -> dict[str, object]:
    upper = auc_diff["estimate"] + Z95_ONE_SIDED * auc_diff["se"]
    margin = gates.noninferiority_margin
    return _check(
        "auc_not_worse",
        upper >= -margin,
        f"upper 95% bound of AUC(challenger) - AUC(champion) >= -{margin:g} "
        "(gates.noninferiority_margin)",
        f"{auc_diff['estimate']:+.4f}, upper bound {beside(upper, -margin, 4, signed=True)}",
    )


def _score_shift(
    gates: Gates,
    challenger: dict[str, float],
    champion: dict[str, float],
    p_champion: np.ndarray,
    p: np.ndarray,
) -> list[dict[str, object]]:
    """The score distribution's shift from the champion's, accepted when the challenger
    is better calibrated (none when ``gates.score_psi_limit`` is null)."""
    if gates.score_psi_limit is None:
        return []
    shift = psi(p_champion, p)
    calibrated = challenger["brier"] < champion["brier"] and challenger["ece"] < champion["ece"]
    found = f"PSI {beside(shift, gates.score_psi_limit)}"
    if shift > gates.score_psi_limit:
        found += (
            f"; challenger better calibrated on the holdout (Brier {challenger['brier']:.5f} "
            f"vs {champion['brier']:.5f}, ECE {challenger['ece']:.4f} vs "
            f"{champion['ece']:.4f}): the shift is a fix"
            if calibrated
            else f"; not better calibrated on the holdout (Brier {challenger['brier']:.5f} "
            f"vs {champion['brier']:.5f}, ECE {challenger['ece']:.4f} vs {champion['ece']:.4f})"
        )
    return [
        _check(
            "score_shift_vs_champion",
            shift <= gates.score_psi_limit or calibrated,
            f"score PSI vs the champion <= {gates.score_psi_limit:g} (gates.score_psi_limit), "
            "or better calibrated on the holdout",
            found,
        )
    ]


@dataclass(frozen=True)
class Verdict:
    """What the gates found on one holdout: both models' metrics, the paired evidence
    (empty without a champion) and every check."""

    metrics: dict[str, dict[str, float] | None]
    evidence: dict[str, dict[str, float]]
    checks: list[dict[str, object]]

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [describe(c) for c in self.checks if not c["passed"]]


def judge(
    gates: Gates,
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray | None = None,
    *,
    entity: np.ndarray | None = None,
    capacity: int | None = None,
    decayed: str | None = None,
    schema_problems: list[str] | None = None,
    holdout_dates: int = 1,
) -> Verdict:
    """Run the promotion gates on a labelled holdout scored by the challenger (and the
    champion, when there is one): the one decision rule the nightly run and
    ``benchmarks/gates.py`` both apply."""
    ch = classification_metrics(y, p_challenger, capacity=capacity)
    champ = None if p_champion is None else classification_metrics(y, p_champion, capacity=capacity)
    evidence = {} if p_champion is None else paired_evidence(y, p_challenger, p_champion, entity)
    checks = gate_checks(
        gates,
        challenger=ch,
        p_challenger=p_challenger,
        champion=champ,
        p_champion=p_champion,
        evidence=evidence,
        schema_problems=schema_problems,
        decayed=decayed,
        holdout_dates=holdout_dates,
    )
    return Verdict({"challenger": ch, "champion": champ}, evidence, checks)


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


@dataclass(frozen=True)
class Evaluation:
    """One night's champion/challenger evaluation: what was compared, on which holdout
    dates, what the gates found and what became of the challenger. ``evaluate_challenger``
    builds it; the report, ``ml.evaluations``, the approval form and the XCom read it.

    Attributes:
        holdouts: per pooled holdout date: as_of, rows, positives, sha256 and ``compared``
            (the champion is judged on the dates out of time for it too).
        verdict: the gates' findings; None when the challenger is the champion's bytes.
        decision: ``promote``, ``awaiting_approval``, ``shadow``, ``reject`` or
            ``identical`` (the same artifact as the champion: nothing to decide).
        decayed: why monitoring counts the champion as decayed, if it does.
        same_as: the version registered earlier with the challenger's bytes, if any.
    """

    use_case: str
    challenger: str
    champion: str | None
    holdouts: list[dict[str, Any]]
    verdict: Verdict | None
    decision: str
    reasons: list[str]
    decayed: str | None = None
    same_as: str | None = None

    @property
    def metrics(self) -> dict[str, dict[str, float] | None]:
        return self.verdict.metrics if self.verdict else {"challenger": None, "champion": None}

    @property
    def evidence(self) -> dict[str, dict[str, float]]:
        return self.verdict.evidence if self.verdict else {}

    @property
    def checks(self) -> list[dict[str, object]]:
        return self.verdict.checks if self.verdict else []

    def summary_markdown(self, report_url: str | None) -> str:
        """The evaluation as Markdown, for the approver in the Airflow UI."""
        lines = [
            f"**Challenger** `{self.challenger}` vs **champion** `{self.champion or 'none'}`: "
            f"**{self.decision}**",
        ]
        if self.same_as:
            lines += [
                "",
                f"Identical to `{self.same_as}`: the same artifact bytes, registered before.",
            ]
        if self.decayed:
            lines += [
                "",
                f"The champion has decayed ({self.decayed}): it must be shown better to stay.",
            ]
        dated = ", ".join(
            f"{h['as_of']} ({h['positives']:,} positives of {h['rows']:,})" for h in self.holdouts
        )
        lines += ["", f"Holdout: {dated}."]
        ch, champ = self.metrics["challenger"], self.metrics["champion"]
        if ch:
            lines += ["", "| metric | challenger | champion |", "|---|---|---|"]
            for key in (
                "roc_auc",
                "log_loss",
                "brier",
                "ece",
                "lift_top_decile",
                "precision_at_capacity",
            ):
                if key in ch:
                    other = f"{champ[key]:.4f}" if champ else "-"
                    lines.append(f"| {key} | {ch[key]:.4f} | {other} |")
        for name, e in self.evidence.items():
            lines.append(
                f"\n{name}: {e['estimate']:+.5f} (95% CI {e['low']:+.5f} .. {e['high']:+.5f}); "
                f"P(challenger better) {e['confidence']:.1%}"
            )
        lines += ["", *(f"**{r}**" for r in self.reasons)]
        if self.checks:
            lines += ["", *(f"- {describe(c)}" for c in self.checks)]
        if report_url:
            lines += ["", f"[Evaluation report]({report_url})"]
        return "\n".join(lines)
