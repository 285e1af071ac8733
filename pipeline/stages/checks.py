"""Data quality gates: feature and score checks before publishing, and how results are stored.

Source contracts (checked before featurizing) are in ``pipeline.stages.sources``. Each check
yields a ``CheckResult`` naming the table/column (or feature), what was expected and
what was found. Results are stored in ``monitoring.checks`` (and PSI values in
``monitoring.drift``); any failed check of severity ``fail`` stops the run with a
``GateFailed`` listing them, so nothing is published and yesterday's rows stay served.
Checks of severity ``warn`` are recorded and the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.conf.config import Settings
from pipeline.conf.sections import FeatureChecks, FeatureRule
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import GateFailed
from pipeline.core.figures import beside, percent, within
from pipeline.store import db
from pipeline.store.ledger import RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    stage: str
    check: str
    target: str
    passed: bool
    expected: str
    found: str
    severity: str = "fail"

    def describe(self) -> str:
        verdict = "ok" if self.passed else ("FAILED" if self.severity == "fail" else "warning")
        return f"{verdict}: {self.check} on {self.target}: expected {self.expected}, found {self.found}"


# -- features and scores -----------------------------------------------------------------


def check_features(
    table: pa.Table, uc: UseCase, previous_rows: int | None, reference: dict[str, Any] | None
) -> list[CheckResult]:
    """Keys, nulls, ranges and population size of a snapshot; PSI against the champion's data.

    Nulls and ranges follow the use case's feature-check policy (``feature_checks``): a
    feature's own rule, else the default. A feature with no null limit of its own may still
    not grow its null fraction by more than ``max_null_increase`` over the serving model's
    training data. Rows holding a category training never saw warn above
    ``unseen_share_limit`` and stop the night above the feature's ``max_unseen_share``,
    naming the values that appeared and those that vanished.
    """
    policy = uc.feature_checks
    out = [_duplicate_keys(table, uc.entity_key)]
    for name in table.column_names:
        if name != uc.entity_key:
            out += _column_checks(name, table.column(name), policy, reference)
    if previous_rows:
        out.append(_population_size(table.num_rows, previous_rows, policy))
    out += _unseen_categories(table, reference, policy)
    out += _feature_psi(table, reference, policy)
    return out


def _duplicate_keys(table: pa.Table, entity_key: str) -> CheckResult:
    keys = table.column(entity_key)
    dupes = len(keys) - pc.count_distinct(keys).as_py()
    return CheckResult("features", "duplicate_keys", entity_key, dupes == 0, "0", str(dupes))


def _column_checks(
    name: str, col: pa.ChunkedArray, policy: FeatureChecks, reference: dict[str, Any] | None
) -> list[CheckResult]:
    """A feature's failed null, finite and range checks under its rule of ``policy``."""
    rule = policy.rule(name)
    frac = col.null_count / max(len(col), 1)
    out = []
    if rule.max_null_fraction is not None and frac > rule.max_null_fraction:
        out.append(
            CheckResult(
                "features",
                "null_fraction",
                name,
                False,
                f"<= {rule.max_null_fraction:.0%} nulls",
                percent(frac, rule.max_null_fraction),
            )
        )
    trained = (reference or {}).get(name, {}).get("null_fraction")
    if (
        rule.max_null_fraction is None
        and trained is not None
        and frac > trained + policy.max_null_increase
    ):
        out.append(
            CheckResult(
                "features",
                "null_increase",
                name,
                False,
                f"<= {trained + policy.max_null_increase:.1%} nulls (training data "
                f"{trained:.1%} + feature_checks.max_null_increase {policy.max_null_increase:.0%})",
                percent(frac, trained + policy.max_null_increase),
            )
        )
    if pa.types.is_floating(col.type):
        bad = pc.sum(pc.invert(pc.is_finite(col))).as_py() or 0
        if bad:
            out.append(
                CheckResult(
                    "features",
                    "finite",
                    name,
                    False,
                    "no NaN or infinite values",
                    f"{bad} rows",
                )
            )
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        out += _range_checks(name, col, rule)
    return out


def _range_checks(name: str, col: pa.ChunkedArray, rule: FeatureRule) -> list[CheckResult]:
    """A numeric feature's minimum and maximum outside its rule's bounds."""
    low, high = pc.min(col).as_py(), pc.max(col).as_py()
    out = []
    if rule.min is not None and low is not None and low < rule.min:
        out.append(
            CheckResult(
                "features",
                "range",
                name,
                False,
                f">= {rule.min:g}",
                f"min {_shown(low, rule.min)}",
            )
        )
    if rule.max is not None and high is not None and high > rule.max:
        out.append(
            CheckResult(
                "features",
                "range",
                name,
                False,
                f"<= {rule.max:g}",
                f"max {_shown(high, rule.max)}",
            )
        )
    return out


def _population_size(rows: int, previous_rows: int, policy: FeatureChecks) -> CheckResult:
    ratio = rows / previous_rows
    lo, hi = policy.population_min_ratio, policy.population_max_ratio
    return CheckResult(
        "features",
        "population_size",
        "population",
        lo <= ratio <= hi,
        f"{lo}..{hi} x the previous run ({previous_rows:,})",
        f"{rows:,} ({within(ratio, lo, hi)} x)",
    )


def _unseen_categories(
    table: pa.Table, reference: dict[str, Any] | None, policy: FeatureChecks
) -> list[CheckResult]:
    """Per categorical feature, its rows holding a value training never saw: a failure
    above the feature's ``max_unseen_share``, else a warning above ``unseen_share_limit``."""
    out = []
    for name, change in category_changes(table, reference).items():
        stop = policy.rule(name).max_unseen_share
        if stop is not None and change.share > stop:
            out.append(
                CheckResult(
                    "features",
                    "unseen_categories",
                    name,
                    False,
                    f"<= {stop:.1%} of rows with a value never seen in training, else the night "
                    f"stops (feature_checks max_unseen_share; above unseen_share_limit "
                    f"{policy.unseen_share_limit:.1%} it warns and requests a retrain)",
                    f"{percent(change.share, stop, 2)}; {change.describe()}",
                )
            )
            continue
        limit = policy.unseen_share_limit
        out.append(
            CheckResult(
                "features",
                "unseen_categories",
                name,
                change.share <= limit,
                f"<= {limit:.1%} of rows with a value never seen in training",
                percent(change.share, limit, 2)
                + (f"; {change.describe()}" if change.share > limit else ""),
                severity="warn",
            )
        )
    return out


def _feature_psi(
    table: pa.Table, reference: dict[str, Any] | None, policy: FeatureChecks
) -> list[CheckResult]:
    return [
        CheckResult(
            "features",
            "feature_psi",
            name,
            psi_value <= policy.psi_limit,
            f"PSI <= {policy.psi_limit}",
            beside(psi_value, policy.psi_limit),
            severity="warn",
        )
        for name, psi_value in feature_psi(table, reference).items()
    ]


def _shown(value: float, limit: float) -> str:
    """A feature's extreme against its bound: an integer as is, else to the digit that
    shows its side of the bound."""
    return f"{value:,}" if isinstance(value, int) else beside(value, limit, 2)


def reference_profile(table: pa.Table, columns: list[str], bins: int = 10) -> dict[str, Any]:
    """Per feature, its training distribution for PSI: quantile edges and proportions of a
    numeric feature, the share of each value of a categorical one."""
    profile: dict[str, Any] = {}
    for name in columns:
        col = table.column(name)
        profile[name] = {"null_fraction": col.null_count / max(len(col), 1)}
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            profile[name]["categories"] = _category_shares(col)
            continue
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue
        x = col.to_numpy(zero_copy_only=False).astype(np.float64)
        x = x[~np.isnan(x)]
        if len(x) == 0:
            continue
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
        profile[name] |= {"edges": edges.tolist(), "proportions": (counts / len(x)).tolist()}
    return profile


@dataclass(frozen=True)
class CategoryChange:
    """How tonight's values of a categorical feature differ from its training data's."""

    share: float  # of tonight's rows, those holding a value training never saw
    appeared: list[tuple[str, int]]  # values training never saw and their rows, most first
    vanished: list[tuple[str, float]]  # values absent tonight and their training share

    def describe(self, shown: int = 5) -> str:
        """The values that appeared and vanished, a few of each."""

        def listed(items: list[str]) -> str:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            return ", ".join(items[:shown]) + more if items else "none"

        appeared = [f"{v!r} ({n:,} rows)" for v, n in self.appeared]
        vanished = [f"{v!r} ({s:.1%} in training)" for v, s in self.vanished]
        return f"appeared: {listed(appeared)}; vanished: {listed(vanished)}"


def category_changes(
    table: pa.Table, reference: dict[str, Any] | None
) -> dict[str, CategoryChange]:
    """Per categorical feature of ``reference`` (training's shares of each value), the rows
    tonight whose value training never saw, the values that appeared and those that
    vanished. A missing value is neither."""
    out: dict[str, CategoryChange] = {}
    for name, ref in (reference or {}).items():
        if "categories" not in ref or name not in table.column_names:
            continue
        col = table.column(name)
        counts = col.cast(pa.string()).value_counts()
        tonight = {
            v: int(n)
            for v, n in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            )
            if v is not None
        }
        trained = {v: float(s) for v, s in ref["categories"].items() if v != "(missing)"}
        appeared = sorted(
            ((v, n) for v, n in tonight.items() if v not in trained), key=lambda x: (-x[1], x[0])
        )
        vanished = sorted(
            ((v, s) for v, s in trained.items() if v not in tonight), key=lambda x: (-x[1], x[0])
        )
        unseen = sum(n for _, n in appeared)
        out[name] = CategoryChange(unseen / max(len(col), 1), appeared, vanished)
    return out


def unseen_shares(table: pa.Table, reference: dict[str, Any] | None) -> dict[str, float]:
    """Per categorical feature, the share of rows whose value training never saw."""
    return {name: c.share for name, c in category_changes(table, reference).items()}


def _category_shares(col: pa.ChunkedArray) -> dict[str, float]:
    counts = col.value_counts()
    total = max(len(col), 1)
    return {
        "(missing)" if value is None else str(value): count / total
        for value, count in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        )
    }


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = np.clip(expected, 1e-4, None)
    actual = np.clip(actual, 1e-4, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_psi(table: pa.Table, reference: dict[str, Any] | None) -> dict[str, float]:
    """PSI of each referenced feature tonight against its training distribution.

    A category never seen in training (a new country, say) counts in full: its training
    share is taken as 0.01%.
    """
    out: dict[str, float] = {}
    for name, ref in (reference or {}).items():
        if name not in table.column_names:
            continue
        if "categories" in ref:
            tonight = _category_shares(table.column(name))
            values = sorted(set(ref["categories"]) | set(tonight))
            out[name] = _psi(
                np.array([ref["categories"].get(v, 0.0) for v in values]),
                np.array([tonight.get(v, 0.0) for v in values]),
            )
            continue
        if "edges" not in ref:
            continue
        x = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        x = x[~np.isnan(x)]
        if not len(x):
            continue
        edges = np.asarray(ref["edges"])
        actual = np.bincount(
            np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1
        ) / len(x)
        out[name] = _psi(np.asarray(ref["proportions"]), actual)
    return out


def score_psi_check(
    uc: UseCase, probs: np.ndarray, previous_hist: np.ndarray | None
) -> list[CheckResult]:
    """Score distribution tonight vs the previous published night (fixed bins over [0, 1])."""
    out = [
        CheckResult(
            "scores",
            "scores_finite",
            uc.probability_column,
            bool(np.isfinite(probs).all()),
            "finite probabilities",
            f"{int((~np.isfinite(probs)).sum())} not finite",
        )
    ]
    if previous_hist is not None and previous_hist.sum() > 0:
        hist = np.histogram(probs, bins=SCORE_BINS, range=(0.0, 1.0))[0]
        e = np.clip(previous_hist / previous_hist.sum(), 1e-4, None)
        a = np.clip(hist / max(hist.sum(), 1), 1e-4, None)
        value = float(np.sum((a - e) * np.log(a / e)))
        out.append(
            CheckResult(
                "scores",
                "score_psi",
                uc.probability_column,
                value <= uc.monitoring.score_drift_limit,
                f"PSI vs previous night <= {uc.monitoring.score_drift_limit}",
                beside(value, uc.monitoring.score_drift_limit),
                severity="warn",
            )
        )
    return out


SCORE_BINS = 50


def previous_score_histogram(settings: Settings, uc: UseCase, before: date) -> np.ndarray | None:
    """Histogram of the newest published night before ``before`` (computed in the database)."""
    prev = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.publications WHERE use_case = %s AND score_date < %s",
        (uc.name, before),
    )
    return None if prev is None else score_histogram(settings, uc, prev)


def score_histogram(settings: Settings, uc: UseCase, day: date) -> np.ndarray:
    """Counts of the served probabilities of ``day`` in ``SCORE_BINS`` equal bins over [0, 1]."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT least(width_bucket({db.quote_ident(uc.probability_column)}, 0, 1, %s), "
                f"%s), count(*) FROM {db.quote_ident('predictions', uc.score_table)} "
                "WHERE score_date = %s GROUP BY 1",
                (SCORE_BINS, SCORE_BINS, day),
            )
            hist = np.zeros(SCORE_BINS)
            for bucket, n in cur.fetchall():
                hist[int(bucket) - 1] = n
        conn.commit()
    finally:
        conn.close()
    return hist


# -- storage and the gate ----------------------------------------------------------------


def record_and_gate(
    settings: Settings, run: RunContext, results: list[CheckResult], stage: str
) -> dict[str, Any]:
    """Store every result; stop the run if any ``fail`` check failed."""
    rows = [
        (
            run.use_case,
            run.score_date,
            run.run_id,
            r.stage,
            r.check,
            r.target,
            r.severity,
            r.passed,
            r.expected,
            r.found,
            r.describe(),
        )
        for r in results
    ]
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO monitoring.checks (use_case, score_date, run_id, stage, check_name, target, "
                "severity, passed, expected, found, message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
            drift = [
                (run.use_case, run.score_date, run.run_id, r.target, float(r.found), r.passed)
                for r in results
                if r.check in ("feature_psi", "score_psi")
            ]
            cur.executemany(
                "INSERT INTO monitoring.drift (use_case, score_date, run_id, feature, psi, within_limit) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                drift,
            )
        conn.commit()
    finally:
        conn.close()
    failed = [r for r in results if not r.passed and r.severity == "fail"]
    warned = [r for r in results if not r.passed and r.severity == "warn"]
    for r in failed + warned:
        log.warning("%s %s %s", run.use_case, run.score_date, r.describe())
    if failed:
        raise GateFailed(
            f"{len(failed)} {stage} check(s) failed for {run.use_case} as of {run.score_date}; nothing was "
            "published and the previous predictions stay served:\n"
            + "\n".join(r.describe() for r in failed)
            + "\nFix the data (or the use case's contract or feature_checks) and re-run the date."
        )
    return {
        "checks": len(results),
        "failed": 0,
        "warnings": len(warned),
        "warned": [asdict(r) for r in warned][:20],
    }
