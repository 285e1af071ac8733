"""Data quality gates: source contracts before featurizing, feature and score checks before publishing.

Each check yields a ``CheckResult`` naming the table/column (or feature), what was expected
and what was found. Results are stored in ``monitoring.checks`` (and PSI values in
``monitoring.drift``); any failed check of severity ``fail`` stops the run with a
``GateFailed`` listing them, so nothing is published and yesterday's rows stay served.
Checks of severity ``warn`` are recorded and the run goes on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import db
from pipeline.config import SQL_DIR, Settings, UseCase
from pipeline.errors import GateFailed
from pipeline.ledger import RunContext

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


def contract(uc: UseCase) -> dict[str, Any]:
    return dict(json.loads((SQL_DIR / "contracts" / f"{uc.name}_sources.json").read_text()))


# -- sources -----------------------------------------------------------------------------


def check_sources(settings: Settings, uc: UseCase, as_of: date) -> list[CheckResult]:
    """Contract, freshness, future rows, volume, value rules, keys and nulls of every source."""
    spec = contract(uc)
    schema = settings.warehouse_schema
    window = int(spec.get("window_days", 30))
    results: list[CheckResult] = []
    conn = db.connect(settings.warehouse_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s",
                (schema,),
            )
            found: dict[str, dict[str, str]] = {}
            for table, column, dtype in cur.fetchall():
                found.setdefault(table, {})[column] = dtype
            for table, tspec in spec["tables"].items():
                target = f"{schema}.{table}"
                if table not in found:
                    results.append(
                        CheckResult(
                            "sources", "table_exists", target, False, "the table", "no such table"
                        )
                    )
                    continue
                shape_ok = True
                for column, dtype in tspec["columns"].items():
                    have = found[table].get(column)
                    if have is None:
                        shape_ok = False
                        results.append(
                            CheckResult(
                                "sources",
                                "column_exists",
                                f"{target}.{column}",
                                False,
                                f"column of type {dtype}",
                                f"no such column (columns: {', '.join(sorted(found[table]))})",
                            )
                        )
                    elif have != dtype:
                        shape_ok = False
                        results.append(
                            CheckResult(
                                "sources", "column_type", f"{target}.{column}", False, dtype, have
                            )
                        )
                if shape_ok:
                    results += _data_checks(
                        cur, schema, table, tspec, as_of, window, float(spec["max_null_fraction"])
                    )
        conn.commit()
    finally:
        conn.close()
    return results


def _data_checks(
    cur: Any,
    schema: str,
    table: str,
    tspec: dict[str, Any],
    as_of: date,
    window: int,
    max_null: float,
) -> list[CheckResult]:
    t = f"{schema}.{table}"
    dcol = tspec["date_column"]
    out = []
    cur.execute(f"SELECT count(*) FROM {t} WHERE {dcol} > current_date")
    future = cur.fetchone()[0]
    out.append(
        CheckResult(
            "sources",
            "no_future_rows",
            f"{t}.{dcol}",
            future == 0,
            "0 rows dated after today",
            f"{future} rows",
        )
    )
    last_day = as_of - timedelta(days=1)
    if tspec.get("fresh"):
        cur.execute(f"SELECT max({dcol}) FROM {t} WHERE {dcol} < %s", (as_of,))
        latest = cur.fetchone()[0]
        out.append(
            CheckResult(
                "sources",
                "fresh_through",
                f"{t}.{dcol}",
                latest == last_day,
                f"rows through {last_day}",
                f"latest {latest}",
            )
        )
    if "volume" in tspec:
        vol = tspec["volume"]
        days = int(vol.get("trailing_days", 28))
        cur.execute(
            f"SELECT {dcol}, count(*) FROM {t} WHERE {dcol} >= %s AND {dcol} < %s GROUP BY 1",
            (as_of - timedelta(days=days + 1), as_of),
        )
        counts = dict(cur.fetchall())
        trailing = [counts.get(last_day - timedelta(days=i), 0) for i in range(1, days + 1)]
        median = float(np.median(trailing)) if trailing else 0.0
        today = counts.get(last_day, 0)
        ratio = today / median if median else float("inf")
        ok = vol["min_ratio"] <= ratio <= vol["max_ratio"]
        out.append(
            CheckResult(
                "sources",
                "daily_volume",
                f"{t} on {last_day}",
                ok,
                f"{vol['min_ratio']}..{vol['max_ratio']} x the trailing {days}-day median ({median:,.0f} rows)",
                f"{today:,} rows ({ratio:.2f} x)",
            )
        )
    for rule in tspec.get("values", []):
        cur.execute(
            f"SELECT count(*) FROM {t} WHERE {dcol} >= %s AND {dcol} < %s AND NOT ({rule})",
            (as_of - timedelta(days=window), as_of),
        )
        bad = cur.fetchone()[0]
        out.append(
            CheckResult(
                "sources",
                "value_rule",
                t,
                bad == 0,
                f"every recent row has {rule}",
                f"{bad} rows violate it",
            )
        )
    for key in tspec.get("unique", []):
        cur.execute(f"SELECT count(*) - count(DISTINCT {key}) FROM {t}")
        dupes = cur.fetchone()[0]
        out.append(
            CheckResult(
                "sources",
                "unique_key",
                f"{t}.{key}",
                dupes == 0,
                "one row per key",
                f"{dupes} duplicate rows",
            )
        )
    cols = list(tspec["columns"])
    cur.execute(
        f"SELECT count(*), {', '.join(f'count({c})' for c in cols)} FROM {t} WHERE {dcol} >= %s AND {dcol} < %s",
        (as_of - timedelta(days=window), as_of),
    )
    total, *non_null = cur.fetchone()
    for c, n in zip(cols, non_null, strict=True):
        frac = (total - n) / total if total else 0.0
        if frac > max_null:
            out.append(
                CheckResult(
                    "sources",
                    "null_fraction",
                    f"{t}.{c}",
                    False,
                    f"<= {max_null:.0%} nulls",
                    f"{frac:.1%} nulls in the last {window} days",
                )
            )
    return out


# -- features and scores -----------------------------------------------------------------

NULLABLE_FEATURES = {"usage_trend": 0.6}


def check_features(
    table: pa.Table, uc: UseCase, previous_rows: int | None, reference: dict[str, Any] | None
) -> list[CheckResult]:
    """Keys, nulls, ranges and population size of a snapshot; PSI against the champion's data."""
    out = []
    keys = table.column(uc.entity_key)
    dupes = len(keys) - pc.count_distinct(keys).as_py()
    out.append(
        CheckResult("features", "duplicate_keys", uc.entity_key, dupes == 0, "0", str(dupes))
    )
    for name in table.column_names:
        if name == uc.entity_key:
            continue
        col = table.column(name)
        frac = col.null_count / max(len(col), 1)
        limit = NULLABLE_FEATURES.get(name, 0.01)
        if frac > limit:
            out.append(
                CheckResult(
                    "features", "null_fraction", name, False, f"<= {limit:.0%} nulls", f"{frac:.1%}"
                )
            )
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            low = pc.min(col).as_py()
            if low is not None and low < 0 and name not in ("fee_change_90d",):
                out.append(CheckResult("features", "range", name, False, ">= 0", f"min {low}"))
    if previous_rows:
        ratio = len(keys) / previous_rows
        out.append(
            CheckResult(
                "features",
                "population_size",
                "population",
                uc.population_min_ratio <= ratio <= uc.population_max_ratio,
                f"{uc.population_min_ratio}..{uc.population_max_ratio} x the previous run ({previous_rows:,})",
                f"{len(keys):,} ({ratio:.2f} x)",
            )
        )
    for name, psi_value in feature_psi(table, reference).items():
        out.append(
            CheckResult(
                "features",
                "feature_psi",
                name,
                psi_value <= uc.feature_psi_limit,
                f"PSI <= {uc.feature_psi_limit}",
                f"{psi_value:.3f}",
                severity="warn",
            )
        )
    return out


def reference_profile(table: pa.Table, columns: list[str], bins: int = 10) -> dict[str, Any]:
    """Per feature, its training distribution for PSI: quantile edges and proportions of a
    numeric feature, the share of each value of a categorical one."""
    profile: dict[str, Any] = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            profile[name] = {"categories": _category_shares(col)}
            continue
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue
        x = col.to_numpy(zero_copy_only=False).astype(np.float64)
        x = x[~np.isnan(x)]
        if len(x) == 0:
            continue
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
        profile[name] = {"edges": edges.tolist(), "proportions": (counts / len(x)).tolist()}
    return profile


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
                value <= uc.score_drift_limit,
                f"PSI vs previous night <= {uc.score_drift_limit}",
                f"{value:.3f}",
                severity="warn",
            )
        )
    return out


SCORE_BINS = 50


def previous_score_histogram(settings: Settings, uc: UseCase, before: date) -> np.ndarray | None:
    """Histogram of the newest published night before ``before`` (computed in the database)."""
    prev = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.runs WHERE use_case = %s AND status = 'published' AND score_date < %s",
        (uc.name, before),
    )
    return None if prev is None else score_histogram(settings, uc, prev)


def score_histogram(settings: Settings, uc: UseCase, day: date) -> np.ndarray:
    """Counts of the served probabilities of ``day`` in ``SCORE_BINS`` equal bins over [0, 1]."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT least(width_bucket({uc.probability_column}, 0, 1, %s), %s), count(*) "
                f"FROM predictions.{uc.score_table} WHERE score_date = %s GROUP BY 1",
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
            + "\nFix the data (or the contract in sql/contracts/) and re-run the date."
        )
    return {
        "checks": len(results),
        "failed": 0,
        "warnings": len(warned),
        "warned": [asdict(r) for r in warned][:20],
    }
