"""Uplift: who does the treatment (a retention offer, say) change, and is a ranking worth using.

The outcome ``y = 1`` is the event the treatment tries to prevent (a cancellation, say), so uplift is
``P(y = 1 | control) - P(y = 1 | treated)``: positive where the treatment prevents the outcome,
negative for "sleeping dogs" whom it provokes. Evaluation needs a randomized experiment: rows
with ``treated`` chosen at random, their outcome observed afterwards.

Ranking metrics rank rows by score, highest first. Rows with equal scores form one tie group
that is targeted together: curves are evaluated at the ends of tie groups (and at the origin)
and are linear between them, so the row order of the input never changes a result. With
``Y1(k), N1(k)`` the positives and rows among treated rows in the top ``k``, and ``Y0(k),
N0(k)`` among control rows:

- Qini curve (Radcliffe): ``gain(k) = Y0(k) * N1(k) / N0(k) - Y1(k)``, 0 where ``N0(k) = 0``:
  outcomes prevented among the targeted treated rows. ``gain(n) = N1 * (r0 - r1)``.
- Uplift curve: ``U(k) = (Y0(k) / N0(k) - Y1(k) / N1(k)) * k``, 0 where either count is 0.

Both are scikit-uplift's ``qini_curve`` and ``uplift_curve`` applied to the complement
outcome ``1 - y`` (except at depths where an arm is still empty), on the axis ``k / n``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sklearn.ensemble import HistGradientBoostingClassifier

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]

MIN_ARM_ROWS = 30
MIN_ARM_OUTCOMES = 5  # of each outcome, per arm: fewer and a per-arm model learns nothing

# Small and regularized: the control arm is often only 10-20% of the rows.
DEFAULT_PARAMS = MappingProxyType(
    {
        "max_iter": 150,
        "learning_rate": 0.05,
        "max_leaf_nodes": 15,
        "min_samples_leaf": 40,
        "l2_regularization": 1.0,
        "early_stopping": False,
        "categorical_features": "from_dtype",
    }
)

# Resamples x rows per block: 100k keeps a block's arrays in a core's cache (1M was 2x slower).
_BLOCK_CELLS = 100_000

# numpy < 2.0 has only trapz; numpy 2.4 has only trapezoid
_trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TwoModel:
    """A T-learner: one classifier fitted on treated rows, one on control rows."""

    treated_model: HistGradientBoostingClassifier
    control_model: HistGradientBoostingClassifier
    columns: tuple[str, ...]
    categorical: tuple[str, ...]

    def predict_uplift(self, X: pd.DataFrame, risk: np.ndarray | None = None) -> np.ndarray:
        """``P(y = 1 | control) - P(y = 1 | treated)`` per row of ``X``: the prevented
        probability (``risk`` is not used: each arm has its own model of it)."""
        features = self._features(X)
        return _positive_probability(self.control_model, features) - _positive_probability(
            self.treated_model, features
        )

    def predict_risk(self, X: pd.DataFrame) -> np.ndarray:
        """``P(y = 1 | control)`` per row of ``X``: the risk if left untreated."""
        return _positive_probability(self.control_model, self._features(X))

    def _features(self, X: pd.DataFrame) -> pd.DataFrame:
        return _as_categories(_columns(self.columns, X))


@dataclass(frozen=True)
class EffectModel:
    """The treatment as a shift of the outcome's log-odds, on top of a risk model.

    ``P(y = 1 | x, treated) = sigmoid(a * logit(risk) + b + treated * (c + w . z(x)))``:
    ``risk`` is the served probability of a model trained without the treatment, ``z(x)``
    the features one-hot encoded and standardized. Only the effect (``c + w . z``) and a
    recalibration of the risk are learned, one L2-penalized logistic regression over every
    row of both arms, so it needs far fewer outcomes than a model per arm; the uplift it
    predicts is larger where the risk is (a shift of the log-odds removes more of a large
    probability).
    """

    preprocess: Any  # ColumnTransformer: one-hot categories, standardized numbers
    model: Any  # LogisticRegression over [logit(risk), treated, treated * z(x)]
    columns: tuple[str, ...]

    def predict_uplift(self, X: pd.DataFrame, risk: np.ndarray | None = None) -> np.ndarray:
        """``P(y = 1 | untreated) - P(y = 1 | treated)`` per row: the prevented probability."""
        if risk is None:
            raise ValueError("an effect model's uplift needs each row's risk (served probability)")
        z = self._z(X)
        return _effect_probability(self.model, z, risk, 0.0) - _effect_probability(
            self.model, z, risk, 1.0
        )

    def effect(self, X: pd.DataFrame) -> np.ndarray:
        """The log-odds shift of the outcome if treated (negative: the treatment prevents)."""
        z = self._z(X)
        coef = self.model.coef_[0]
        return np.asarray(coef[1] + z @ coef[2:], dtype=np.float64)

    def _z(self, X: pd.DataFrame) -> np.ndarray:
        # the preprocessing is dense (sparse_threshold=0.0)
        return np.asarray(self.preprocess.transform(_columns(self.columns, X)), dtype=np.float64)


def _columns(columns: tuple[str, ...], X: pd.DataFrame) -> pd.DataFrame:
    """``X``'s columns the model was fitted on, in that order.

    Raises:
        ValueError: some are missing.
    """
    missing = [c for c in columns if c not in X.columns]
    if missing:
        raise ValueError(
            f"uplift model: expected feature columns {list(columns)}, "
            f"missing {missing}; score the columns the model was fitted on"
        )
    return X[list(columns)]


def _effect_design(z: np.ndarray, risk: np.ndarray, treated: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(risk, dtype=np.float64), 1e-6, 1 - 1e-6)
    t = np.broadcast_to(np.asarray(treated, dtype=np.float64).reshape(-1, 1), (len(z), 1))
    return np.hstack([np.log(p / (1 - p))[:, None], t, z * t])


def _effect_probability(model: Any, z: np.ndarray, risk: np.ndarray, treated: float) -> np.ndarray:
    return np.asarray(model.predict_proba(_effect_design(z, risk, treated))[:, 1], dtype=np.float64)


def fit_effect_model(
    X: pd.DataFrame,
    risk: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    penalty: float = 3.0,
) -> EffectModel:
    """Fit an ``EffectModel`` on a randomized experiment.

    Args:
        X: Features, one row per entity (object and string columns are categories).
        risk: Each row's probability of the outcome from the risk model, untreated.
        treated: True where the row received the treatment.
        y: The outcome (1 = the event the treatment should prevent).
        penalty: The inverse of LogisticRegression's ``C``: larger shrinks the effect's
            dependence on the features towards one shift for everyone.

    Raises:
        ValueError: as ``fit_two_model``, for arms too small to learn from.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    treated_arr = _binary("treated", treated, len(X)).astype(bool)
    y_arr = _binary("y", y, len(X)).astype(np.int64)
    _check_arms(treated_arr, y_arr)
    text = [
        c
        for c in X.columns
        if X[c].dtype == object or isinstance(X[c].dtype, (pd.CategoricalDtype, pd.StringDtype))
    ]
    numbers = [c for c in X.columns if c not in text]
    preprocess = ColumnTransformer(
        [
            ("categories", OneHotEncoder(handle_unknown="ignore"), text),
            ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
        ],
        sparse_threshold=0.0,
    ).fit(X)
    z = EffectModel(preprocess, None, tuple(X.columns))._z(X)
    fitted = LogisticRegression(C=1.0 / penalty, max_iter=5000).fit(
        _effect_design(z, risk, treated_arr.astype(np.float64)), y_arr
    )
    return EffectModel(preprocess, fitted, tuple(X.columns))


def fit_two_model(
    X: pd.DataFrame,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    params: dict[str, Any] | None = None,
) -> TwoModel:
    """Fit a T-learner of HistGradientBoostingClassifier on a randomized experiment.

    Object and string columns of ``X`` are treated as categories, like ``category`` columns
    (at most 255 distinct values each). ``X`` is not modified. The fitted models keep no
    record of the thread count, so the same inputs and seed pickle to the same bytes.

    Args:
        X: Features, one row per entity.
        treated: True where the row received the treatment, one value per row.
        y: The outcome (1 = the event the treatment should prevent), one value per row.
        seed: Random state of both classifiers.
        params: HistGradientBoostingClassifier parameters overriding ``DEFAULT_PARAMS``.

    Raises:
        ValueError: If an arm has fewer than ``MIN_ARM_ROWS`` rows or fewer than
            ``MIN_ARM_OUTCOMES`` rows of either outcome, if a parameter is unknown, or if the
            arrays do not have one value per row of ``X``.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    from pipeline.stages.train import without_thread_count

    treated_arr = _binary("treated", treated, len(X)).astype(bool)
    y_arr = _binary("y", y, len(X)).astype(np.int64)
    _check_arms(treated_arr, y_arr)
    settings = {**DEFAULT_PARAMS, **(params or {})}
    allowed = set(HistGradientBoostingClassifier().get_params()) - {"random_state"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(
            f"uplift model params: expected HistGradientBoostingClassifier parameters "
            f"({', '.join(sorted(allowed))}; the seed is its own argument), found {unknown}"
        )
    features = _as_categories(X)
    models = []
    for arm in (treated_arr, ~treated_arr):
        model = HistGradientBoostingClassifier(random_state=seed, **settings)
        fitted = model.fit(features.iloc[np.flatnonzero(arm)], y_arr[arm])
        models.append(without_thread_count(fitted))
    categorical = tuple(
        c for c in features.columns if isinstance(features[c].dtype, pd.CategoricalDtype)
    )
    return TwoModel(models[0], models[1], tuple(X.columns), categorical)


def qini_curve(
    score: np.ndarray, treated: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The Qini curve of targeting by ``score``, highest first.

    Returns:
        ``(fraction, gain)``: the targeted share ``k / n`` at the origin and at the end of
        each tie group (``0`` to ``1``), and ``gain(k) = Y0(k) * N1(k) / N0(k) - Y1(k)``
        there (0 while ``N0(k) = 0``), in outcomes prevented.
    """
    cum = _cumulative(_Ranking.of(score), *_outcomes(score, treated, y))
    return cum.rows[0] / cum.rows[0, -1], _gain(cum)[0]


def qini_coefficient(score: np.ndarray, treated: np.ndarray, y: np.ndarray) -> float:
    """Area between the Qini curve and random targeting, per row.

    ``(1 / n) * integral over f in [0, 1] of (gain(f) - f * gain(1)) df`` (trapezoid rule on
    the ``qini_curve`` points): outcomes prevented per row beyond random targeting, averaged
    over targeting depths. 0 for a constant score; negative when the ranking is worse than
    random. Not scikit-uplift's ``qini_auc_score``, which divides by a perfect ranking's area.
    """
    return float(_qini_rows(_cumulative(_Ranking.of(score), *_outcomes(score, treated, y)))[0])


def auuc(score: np.ndarray, treated: np.ndarray, y: np.ndarray) -> float:
    """Area under the uplift curve, per row.

    ``(1 / n) * integral over f in [0, 1] of U(f) df`` with ``U(k) = (Y0(k) / N0(k) -
    Y1(k) / N1(k)) * k`` (0 while an arm is empty) at ``f = k / n``, trapezoid rule over
    tie-group ends. Equals scikit-uplift's ``auuc`` (``auc(*uplift_curve(...))``) on the
    outcome ``1 - y``, divided by ``n ** 2``. Close to causalml's
    ``auuc_score(normalize=False)`` on ``1 - y`` divided by ``n`` (it averages over rows
    instead, skips depths where an arm is empty and breaks ties by row order). No random
    baseline is removed: random targeting scores about ``(r0 - r1) / 2``.
    """
    return float(_auuc_rows(_cumulative(_Ranking.of(score), *_outcomes(score, treated, y)))[0])


def uplift_at(score: np.ndarray, treated: np.ndarray, y: np.ndarray, fraction: float) -> float:
    """Control outcome rate minus treated outcome rate among the top ``fraction`` by score.

    The top ``fraction * n`` rows; a tie group straddling the cut contributes pro rata (its
    counts interpolated linearly). NaN when the top holds no control or no treated row.

    Raises:
        ValueError: If ``fraction`` is not in ``(0, 1]``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"uplift_at: expected a fraction in (0, 1], found {fraction}")
    cum = _cumulative(_Ranking.of(score), *_outcomes(score, treated, y))
    depth = fraction * cum.rows[0, -1]
    n1, y1, n0, y0 = (float(np.interp(depth, cum.rows[0], c[0])) for c in cum.arms())
    if n0 <= 0 or n1 <= 0:
        return float("nan")
    return y0 / n0 - y1 / n1


def bootstrap(
    metric: Metric,
    score: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap interval of ``metric(score, treated, y)``, stratified by arm.

    Each resample draws the treated rows and the control rows separately, with replacement,
    keeping both arm sizes. ``qini_coefficient`` and ``auuc`` are computed for blocks of
    resamples at once (1000 resamples of 20,000 rows: about 1 s on one core); any other
    metric is called once per resample.

    Returns:
        ``estimate`` (the metric on the sample itself), ``low`` and ``high``.
    """
    estimate = metric(score, treated, y)
    draws = _draws(metric, [score], treated, y, resamples=resamples, seed=seed)[0]
    return {"estimate": estimate, **_interval(draws, confidence)}


def compare(
    challenger_score: np.ndarray,
    champion_score: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    *,
    metric: Metric = qini_coefficient,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """``metric`` (the Qini coefficient unless told) of two rankings on the same
    experiment, and of their difference.

    Both rankings are scored on the same stratified resamples, so the interval of
    ``difference`` (challenger minus champion) reflects the difference, not two noises.

    Returns:
        ``challenger``, ``champion`` and ``difference``, each ``{estimate, low, high}``.
    """
    estimates = [metric(s, treated, y) for s in (challenger_score, champion_score)]
    draws = _draws(
        metric,
        [challenger_score, champion_score],
        treated,
        y,
        resamples=resamples,
        seed=seed,
    )
    return {
        "challenger": {"estimate": estimates[0], **_interval(draws[0], confidence)},
        "champion": {"estimate": estimates[1], **_interval(draws[1], confidence)},
        "difference": {
            "estimate": estimates[0] - estimates[1],
            **_interval(draws[0] - draws[1], confidence),
        },
    }


@dataclass(frozen=True)
class _Ranking:
    """Rows in descending score order (stable), and the sorted positions ending a tie group."""

    order: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, score: np.ndarray) -> _Ranking:
        s = np.asarray(score, dtype=np.float64)
        if s.ndim != 1 or not np.isfinite(s).all():
            raise ValueError("uplift: expected a 1-D score with finite values only")
        order = np.argsort(-s, kind="stable")
        ranked = s[order]
        return cls(order, np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True]))


@dataclass(frozen=True)
class _Cumulative:
    """Weighted counts within the top of the ranking, one row per resample.

    Columns are the origin and each tie-group end: ``rows`` targeted, and per arm the rows
    (``n1``, ``n0``) and positive outcomes (``y1``, ``y0``) among them.
    """

    rows: np.ndarray
    n1: np.ndarray
    y1: np.ndarray
    n0: np.ndarray
    y0: np.ndarray

    def arms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.n1, self.y1, self.n0, self.y0


def _cumulative(
    ranking: _Ranking, treated: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None
) -> _Cumulative:
    """Cumulative counts for each row of ``weight`` (resamples x rows; all ones if None)."""
    t = treated[ranking.order]
    yt = (y[ranking.order] == 1) & t
    yc = (y[ranking.order] == 1) & ~t
    w = np.ones((1, len(t))) if weight is None else weight[:, ranking.order]

    def at_ends(column: np.ndarray | None) -> np.ndarray:
        running = np.cumsum(w if column is None else w * column, axis=1)[:, ranking.ends]
        return np.concatenate([np.zeros((len(w), 1)), running], axis=1)

    rows, n1 = at_ends(None), at_ends(t)
    return _Cumulative(rows, n1, at_ends(yt), rows - n1, at_ends(yc))


def _gain(cum: _Cumulative) -> np.ndarray:
    ratio = np.divide(cum.n1, cum.n0, out=np.zeros_like(cum.n1), where=cum.n0 > 0)
    return np.where(cum.n0 > 0, cum.y0 * ratio - cum.y1, 0.0)


def _qini_rows(cum: _Cumulative) -> np.ndarray:
    total = cum.rows[:, -1:]
    fraction = cum.rows / total
    gain = _gain(cum)
    above_random = gain - fraction * gain[:, -1:]
    return np.asarray(_trapezoid(above_random, fraction, axis=1) / total[:, 0])


def _auuc_rows(cum: _Cumulative) -> np.ndarray:
    total = cum.rows[:, -1:]
    both = (cum.n0 > 0) & (cum.n1 > 0)
    r0 = np.divide(cum.y0, cum.n0, out=np.zeros_like(cum.y0), where=both)
    r1 = np.divide(cum.y1, cum.n1, out=np.zeros_like(cum.y1), where=both)
    curve = (r0 - r1) * cum.rows
    return np.asarray(_trapezoid(curve, cum.rows / total, axis=1) / total[:, 0])


_BATCHED: dict[Callable[..., float], Callable[[_Cumulative], np.ndarray]] = {
    qini_coefficient: _qini_rows,
    auuc: _auuc_rows,
}


def _draws(
    metric: Metric,
    scores: list[np.ndarray],
    treated: np.ndarray,
    y: np.ndarray,
    *,
    resamples: int,
    seed: int,
) -> list[np.ndarray]:
    """``resamples`` bootstrap values of ``metric`` for each score, on the same resamples."""
    checked = [_outcomes(s, treated, y) for s in scores]  # each score matches treated and y
    t, y_arr = checked[0]
    if resamples < 1:
        raise ValueError(f"bootstrap: expected at least 1 resample, found {resamples}")
    batched = _BATCHED.get(metric)
    rankings = [_Ranking.of(s) for s in scores] if batched else []
    arrays = [np.asarray(s, dtype=np.float64) for s in scores]
    out: list[list[np.ndarray]] = [[] for _ in scores]
    n = len(t)
    for idx in _resample_blocks(t, resamples, seed):
        if batched:
            offsets = (np.arange(len(idx)) * n)[:, None]
            counts = np.bincount((idx + offsets).ravel(), minlength=idx.size)
            weight = counts.reshape(idx.shape).astype(np.float64)
            for values, ranking in zip(out, rankings, strict=True):
                values.append(batched(_cumulative(ranking, t, y_arr, weight)))
        else:
            # An arbitrary metric only takes arrays: one call per resample.
            for values, s in zip(out, arrays, strict=True):
                values.append(np.array([metric(s[i], t[i], y_arr[i]) for i in idx]))
    return [np.concatenate(values) for values in out]


def _resample_blocks(treated: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each resample (treated rows drawn among treated, control among control)."""
    rng = np.random.default_rng(seed)
    arms = [np.flatnonzero(treated), np.flatnonzero(~treated)]
    if not all(len(a) for a in arms):
        raise ValueError(
            f"bootstrap: expected treated and control rows, found {len(arms[0])} treated "
            f"and {len(arms[1])} control"
        )
    block = max(1, _BLOCK_CELLS // len(treated))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        yield np.concatenate([a[rng.integers(0, len(a), (size, len(a)))] for a in arms], axis=1)


def _interval(draws: np.ndarray, confidence: float) -> dict[str, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: expected a confidence in (0, 1), found {confidence}")
    tail = 50 * (1 - confidence)
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


def _outcomes(
    score: np.ndarray, treated: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``treated`` as bool and ``y`` as 0/1, checked to match ``score`` and be non-empty."""
    n = len(np.asarray(score))
    if n == 0:
        raise ValueError("uplift: expected at least one scored row, found none")
    return _binary("treated", treated, n).astype(bool), _binary("y", y, n).astype(np.int64)


def _binary(name: str, values: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"uplift: expected {name} with one value per row ({n}), found {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"uplift: expected {name} in {{0, 1}}, found {np.unique(arr)[:5]}")
    return arr


def _check_arms(treated: np.ndarray, y: np.ndarray) -> None:
    found = []
    too_small = False
    for label, arm in (("treated", treated), ("control", ~treated)):
        rows, positives = int(arm.sum()), int(y[arm].sum())
        found.append(f"{label}: {rows} rows, {positives} with y=1")
        too_small |= rows < MIN_ARM_ROWS or min(positives, rows - positives) < MIN_ARM_OUTCOMES
    if too_small:
        raise ValueError(
            f"uplift model: expected at least {MIN_ARM_ROWS} rows and {MIN_ARM_OUTCOMES} rows of "
            f"each outcome in each arm, found {'; '.join(found)}. Use a longer experiment "
            "window or a larger control group."
        )


def _as_categories(X: pd.DataFrame) -> pd.DataFrame:
    """``X`` with object and string columns as ``category`` (a copy when any is converted)."""
    text = X.select_dtypes(include=["object", "string"]).columns
    return X.astype(dict.fromkeys(text, "category")) if len(text) else X


def _positive_probability(model: HistGradientBoostingClassifier, X: pd.DataFrame) -> np.ndarray:
    return np.asarray(model.predict_proba(X)[:, 1], dtype=np.float64)
