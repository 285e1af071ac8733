"""Realized performance: how each published night's scores did once the truth was known.

The label of score date S ("cancelled in [S, S+30)") matures on S+30. From then on the
served scores of S are evaluated against it (AUC, top-decile lift, calibration, positive
rate per risk decile) by model version, in ``monitoring.realized_performance``. When the
newest evaluation falls more than ``decay_threshold`` below the model's own out-of-time
holdout AUC, a retrain is requested for the next night.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from pipeline import db, evaluate, features, registry
from pipeline.config import Settings, UseCase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Realized:
    score_date: date
    model_version: str
    rows: int
    positives: int
    roc_auc: float
    lift_top_decile: float
    holdout_auc: float | None


def matured_unevaluated(settings: Settings, uc: UseCase, as_of: date) -> list[date]:
    """Published score dates whose labels matured before ``as_of`` and have no evaluation yet."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT DISTINCT r.score_date FROM ml.runs r
                WHERE r.use_case = %s AND r.status = 'published' AND r.score_date + %s <= %s
                  AND NOT EXISTS (SELECT 1 FROM monitoring.realized_performance p
                                  WHERE p.use_case = r.use_case AND p.score_date = r.score_date)
                ORDER BY 1
                """,
                (uc.name, uc.label_horizon_days, as_of),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def evaluate_date(settings: Settings, uc: UseCase, score_date: date) -> list[Realized]:
    """Evaluate the served scores of one date against its matured labels."""
    labels = db.read_arrow(
        settings.warehouse_url,
        db.sql_text("features", uc.labels_sql),
        {"as_of": score_date, "label_end": features.label_end(uc, score_date)},
        schema=settings.warehouse_schema,
    )
    served = db.read_arrow(
        settings.database_url,
        f"SELECT {uc.entity_key}, model_version, {uc.probability_column}, risk_decile "
        f"FROM predictions.{uc.score_table} WHERE score_date = :d ORDER BY {uc.entity_key}",
        {"d": score_date},
    )
    label_keys = labels.column(uc.entity_key).to_numpy()  # both queries order by the key
    label_values = labels.column("label").to_numpy()
    keys = served.column(uc.entity_key).to_numpy()
    y = np.zeros(len(keys), dtype=np.int64)
    if len(label_keys):
        idx = np.minimum(np.searchsorted(label_keys, keys), len(label_keys) - 1)
        known = label_keys[idx] == keys
        y[known] = label_values[idx[known]]
    versions = np.asarray(served.column("model_version").to_pylist())
    p = served.column(uc.probability_column).to_numpy()
    deciles = served.column("risk_decile").to_numpy()
    out = []
    for version in sorted(set(versions.tolist())):
        mine = versions == version
        m = evaluate.classification_metrics(y[mine], p[mine])
        rates = {
            int(d): float(y[mine][deciles[mine] == d].mean())
            for d in range(1, 11)
            if (deciles[mine] == d).any()
        }
        holdout = registry.get(settings, uc.name, version).metrics.get("roc_auc")
        _store(
            settings,
            uc,
            score_date,
            version,
            int(mine.sum()),
            int(y[mine].sum()),
            m,
            rates,
            holdout,
        )
        out.append(
            Realized(
                score_date,
                version,
                int(mine.sum()),
                int(y[mine].sum()),
                m["roc_auc"],
                m["lift_top_decile"],
                holdout,
            )
        )
    return out


def _store(
    settings: Settings,
    uc: UseCase,
    day: date,
    version: str,
    rows: int,
    positives: int,
    m: dict[str, float],
    rates: dict[int, float],
    holdout: float | None,
) -> None:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO monitoring.realized_performance (use_case, score_date, model_version, rows,
                    positives, roc_auc, lift_top_decile, brier, ece, decile_rates, holdout_auc)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (use_case, score_date, model_version) DO UPDATE SET
                    rows = EXCLUDED.rows, positives = EXCLUDED.positives, roc_auc = EXCLUDED.roc_auc,
                    lift_top_decile = EXCLUDED.lift_top_decile, brier = EXCLUDED.brier, ece = EXCLUDED.ece,
                    decile_rates = EXCLUDED.decile_rates, holdout_auc = EXCLUDED.holdout_auc,
                    evaluated_at = now()
                """,
                (
                    uc.name,
                    day,
                    version,
                    rows,
                    positives,
                    _num(m["roc_auc"]),
                    _num(m["lift_top_decile"]),
                    _num(m["brier"]),
                    _num(m["ece"]),
                    json.dumps(rates),
                    holdout,
                ),
            )
        conn.commit()
    finally:
        conn.close()


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def update_realized_performance(settings: Settings, uc: UseCase, as_of: date) -> dict[str, Any]:
    """Evaluate every newly matured published date; request a retrain on decay."""
    done = [
        r
        for day in matured_unevaluated(settings, uc, as_of)
        for r in evaluate_date(settings, uc, day)
    ]
    decayed = [
        r
        for r in done
        if r.holdout_auc is not None
        and not np.isnan(r.roc_auc)
        and r.holdout_auc - r.roc_auc > uc.decay_threshold
    ]
    if decayed:
        worst = max(decayed, key=lambda r: r.holdout_auc - r.roc_auc)  # type: ignore[operator]
        registry.request_retrain(
            settings,
            uc.name,
            f"realized AUC {worst.roc_auc:.3f} on {worst.score_date} is {worst.holdout_auc - worst.roc_auc:.3f} "  # type: ignore[operator]
            f"below {worst.model_version}'s holdout AUC {worst.holdout_auc:.3f} (threshold {uc.decay_threshold})",
        )
    log.info("realized performance: %d evaluations, %d decayed", len(done), len(decayed))
    return {
        "evaluated": [f"{r.score_date}:{r.model_version}" for r in done],
        "decayed": len(decayed),
        "as_of": as_of.isoformat(),
    }
