"""Realized performance: how each published night's scores did once the truth was known.

The label of score date S ("cancelled in [S, S+30)") matures on S+30. From then on the
served scores of S are evaluated against it (AUC, top-decile lift, calibration, positive
rate per risk decile) by model version, in ``monitoring.realized_performance``. When the
newest evaluation falls more than ``decay_threshold`` below the model's own out-of-time
holdout AUC, a retrain is requested for the next night.

The same matured labels measure each campaign: the outcome rate of the entities that were
emailed against that of the control band (held-out entities who would have qualified), in
``monitoring.campaign_uplift``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import date
from statistics import NormalDist
from typing import Any

import numpy as np
from psycopg2 import sql

from pipeline.conf.config import Settings
from pipeline.conf.sections import Monitoring
from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.core.errors import DataError
from pipeline.stages import evaluate, features
from pipeline.stages.features import Labels
from pipeline.store import db, registry

log = logging.getLogger(__name__)

UPLIFT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Realized:
    """How one model version's scores of one night did once its labels matured."""

    score_date: date
    model_version: str
    rows: int
    positives: int
    roc_auc: float
    lift_top_decile: float
    holdout_auc: float | None
    ece: float = float("nan")
    holdout_ece: float | None = None
    brier: float = float("nan")
    decile_rates: dict[int, float] = field(default_factory=dict)  # positive rate by risk decile

    def decay(self, limits: Monitoring) -> str | None:
        """Why this night says its model has decayed (``monitoring.decay_threshold`` on the
        ROC AUC, ``monitoring.calibration_threshold`` on the calibration error, each
        against the model's own out-of-time holdout), or None."""
        found = []
        if (
            self.holdout_auc is not None
            and self.holdout_auc - self.roc_auc > limits.decay_threshold
        ):
            found.append(
                f"realized AUC {self.roc_auc:.4f} on {self.score_date} is "
                f"{self.holdout_auc - self.roc_auc:.4f} below {self.model_version}'s holdout AUC "
                f"{self.holdout_auc:.4f} (monitoring.decay_threshold {limits.decay_threshold:g})"
            )
        if (
            self.holdout_ece is not None
            and self.ece - self.holdout_ece > limits.calibration_threshold
        ):
            found.append(
                f"realized calibration error {self.ece:.4f} on {self.score_date} is "
                f"{self.ece - self.holdout_ece:.4f} above {self.model_version}'s holdout "
                f"{self.holdout_ece:.4f} (monitoring.calibration_threshold "
                f"{limits.calibration_threshold:g})"
            )
        return "; ".join(found) or None


def matured_unevaluated(settings: Settings, uc: UseCase, as_of: date) -> list[date]:
    """Published score dates whose labels matured before ``as_of`` and have no evaluation yet."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT r.score_date FROM ml.publications r
                WHERE r.use_case = %s AND r.score_date + %s <= %s
                  AND NOT EXISTS (SELECT 1 FROM monitoring.realized_performance p
                                  WHERE p.use_case = r.use_case AND p.score_date = r.score_date)
                ORDER BY 1
                """,
                (uc.name, uc.label.horizon_days, as_of),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def matured_labels(settings: Settings, uc: UseCase, score_date: date) -> Labels:
    """Labels of the entities active on ``score_date`` (outcome in its label window).

    Only meaningful once the window has closed: ``score_date + label.horizon_days``.
    """
    return features.read_labels(settings, uc, score_date)


def evaluate_date(settings: Settings, uc: UseCase, score_date: date) -> list[Realized]:
    """Evaluate the served scores of one date against its matured labels."""
    labels = matured_labels(settings, uc, score_date)
    key = db.quote_ident(uc.entity_key)
    served = db.read_arrow(
        settings.database_url,
        f"SELECT {key}, model_version, {db.quote_ident(uc.probability_column)}, risk_decile "
        f"FROM {db.quote_ident('predictions', uc.score_table)} WHERE score_date = :d "
        f"ORDER BY {key}",
        {"d": score_date},
    )
    y = labels.of(keys.to_numpy(served.column(uc.entity_key)))
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
        own = registry.get(settings, uc.name, version).metrics
        realized = Realized(
            score_date=score_date,
            model_version=version,
            rows=int(mine.sum()),
            positives=int(y[mine].sum()),
            roc_auc=m["roc_auc"],
            lift_top_decile=m["lift_top_decile"],
            holdout_auc=own.get("roc_auc"),
            ece=m["ece"],
            holdout_ece=own.get("ece"),
            brier=m["brier"],
            decile_rates=rates,
        )
        _store(settings, uc, realized)
        out.append(realized)
    return out


def _store(settings: Settings, uc: UseCase, realized: Realized) -> None:
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
                    realized.score_date,
                    realized.model_version,
                    realized.rows,
                    realized.positives,
                    _num(realized.roc_auc),
                    _num(realized.lift_top_decile),
                    _num(realized.brier),
                    _num(realized.ece),
                    json.dumps(realized.decile_rates),
                    realized.holdout_auc,
                ),
            )
        conn.commit()
    finally:
        conn.close()


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def matured_performance(settings: Settings, uc: UseCase, night: date) -> list[dict[str, Any]]:
    """Realized performance of every night whose labels had matured by ``night`` (score
    date + horizon on or before it), oldest first: what a report of ``night`` may show, a
    backfilled or rewritten one included."""
    return db.records(
        settings.database_url,
        "SELECT score_date, model_version, roc_auc, holdout_auc, decile_rates "
        "FROM monitoring.realized_performance WHERE use_case = %s "
        "AND score_date + %s <= %s ORDER BY score_date, model_version",
        (uc.name, uc.label.horizon_days, night),
    )


def champion_decay(settings: Settings, uc: UseCase, version: str, as_of: date) -> str | None:
    """Why ``version`` counts as decayed for a night of ``as_of`` (see :meth:`Realized.decay`),
    from its newest realized evaluation whose labels had matured by then; None if it has
    not decayed or was never evaluated. As of the night: a backfill never reads a
    later night's outcome."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT score_date, rows, positives, roc_auc, lift_top_decile, holdout_auc, ece "
                "FROM monitoring.realized_performance WHERE use_case = %s AND model_version = %s "
                "AND score_date + %s <= %s ORDER BY score_date DESC LIMIT 1",
                (uc.name, version, uc.label.horizon_days, as_of),
            )
            row = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    if row is None:
        return None
    day, rows, positives, auc, lift, holdout_auc, ece = row
    nan = float("nan")
    realized = Realized(
        score_date=day,
        model_version=version,
        rows=rows,
        positives=positives,
        roc_auc=nan if auc is None else auc,
        lift_top_decile=nan if lift is None else lift,
        holdout_auc=holdout_auc,
        ece=nan if ece is None else ece,
        holdout_ece=registry.get(settings, uc.name, version).metrics.get("ece"),
    )
    return realized.decay(uc.monitoring)


def update_realized_performance(settings: Settings, uc: UseCase, as_of: date) -> dict[str, Any]:
    """Evaluate every newly matured published date; request a retrain on decay."""
    done = [
        r
        for day in matured_unevaluated(settings, uc, as_of)
        for r in evaluate_date(settings, uc, day)
    ]
    decayed = [why for r in done if (why := r.decay(uc.monitoring))]
    if decayed:
        registry.request_retrain(settings, uc.name, "; ".join(decayed[-3:]))
    log.info("realized performance: %d evaluations, %d decayed", len(done), len(decayed))
    return {
        "evaluated": [f"{r.score_date}:{r.model_version}" for r in done],
        "decayed": len(decayed),
        "as_of": as_of.isoformat(),
    }


# -- campaign uplift ----------------------------------------------------------------------


def matured_campaigns(settings: Settings, uc: UseCase, as_of: date) -> list[tuple[str, date]]:
    """Campaigns to measure as of ``as_of``, as (campaign, score_date), oldest first.

    A campaign qualifies once its labels matured (``score_date + label_horizon_days <=
    as_of``) if at least one of its messages was sent and it has no uplift row yet (or
    one measured before first selections were told apart: ``repeat_contacted`` NULL).

    Raises:
        DataError: a campaign's control band and send log disagree on its score date.
    """
    if uc.campaign is None:
        return []
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    """
                SELECT c.campaign, min(c.score_date), max(c.score_date)
                FROM (SELECT campaign, score_date, false AS sent FROM {control}
                      UNION ALL
                      SELECT campaign, score_date, status = 'sent' FROM {send_log}) c
                WHERE NOT EXISTS (SELECT 1 FROM monitoring.campaign_uplift u
                                  WHERE u.use_case = %s AND u.campaign = c.campaign
                                    AND u.repeat_contacted IS NOT NULL)
                GROUP BY c.campaign
                HAVING bool_or(c.sent) AND max(c.score_date) + %s <= %s
                ORDER BY 2, 1
                """
                ).format(
                    control=sql.Identifier("campaigns", uc.campaign.control_table),
                    send_log=sql.Identifier("campaigns", uc.campaign.send_log_table),
                ),
                (uc.name, uc.label.horizon_days, as_of),
            )
            found = cur.fetchall()
        conn.commit()
    finally:
        conn.close()
    mixed = [f"{c} ({lo} .. {hi})" for c, lo, hi in found if lo != hi]
    if mixed:
        raise DataError(
            f"campaigns.{uc.campaign.control_table} and campaigns.{uc.campaign.send_log_table} "
            f"should give each campaign one score date, found several for {', '.join(mixed)}: "
            "fix those rows, then rerun"
        )
    return [(c, lo) for c, lo, _ in found]


def update_campaign_uplift(settings: Settings, uc: UseCase, as_of: date) -> list[dict[str, Any]]:
    """Measure each newly matured campaign: outcome of the contacted vs the control band.

    Contacted are the entities whose message was confirmed sent (status 'sent'; 'sending'
    and 'failed' are left out); control is the campaign's control band. Both count the
    campaign's first selections only (``policy.campaign_groups``): entities an earlier
    campaign had sent an email or put in its control band are counted apart
    (``repeat_contacted``, ``repeat_control``) and left out. The outcome is the use case's
    label over ``[score_date, score_date + label.horizon_days)``.
    ``uplift = control_rate - contacted_rate`` is the outcome prevented per entity
    contacted for the first time (by that email and any the campaign sent them within the
    horizon), with a Wald (normal approximation) 95% interval; rates, uplift and interval
    are None where a group is empty. Campaigns already in ``monitoring.campaign_uplift``
    are not revisited, so reruns add nothing.

    Returns:
        The stored rows, one per campaign measured now (``score_date`` as an ISO string).
    """
    pending = matured_campaigns(settings, uc, as_of)
    labels = {day: matured_labels(settings, uc, day) for day in sorted({d for _, d in pending})}
    rows = [_campaign_uplift(settings, uc, name, day, labels[day]) for name, day in pending]
    if rows:
        _store_uplift(settings, uc, rows)
    log.info("campaign uplift for %s as of %s: %d campaigns measured", uc.name, as_of, len(rows))
    return [r | {"score_date": r["score_date"].isoformat()} for r in rows]


def _campaign_uplift(
    settings: Settings, uc: UseCase, campaign: str, score_date: date, labels: Labels
) -> dict[str, Any]:
    from pipeline.campaigns import policy

    groups = policy.campaign_groups(settings, uc, campaign)
    contacted = groups.column("contacted").to_numpy(zero_copy_only=False).astype(bool)
    first = groups.column("first").to_numpy(zero_copy_only=False).astype(bool)
    y = labels.of(keys.to_numpy(groups.column(uc.entity_key)))
    treated, control = contacted & first, ~contacted & first
    n1, k1 = int(treated.sum()), int(y[treated].sum())
    n0, k0 = int(control.sum()), int(y[control].sum())
    repeats = (int((contacted & ~first).sum()), int((~contacted & ~first).sum()))
    log.info(
        "campaign %s (%s, %s), first selections: %d contacted, %d positive; %d control, "
        "%d positive (left out, selected before: %d contacted, %d control)",
        campaign,
        uc.name,
        score_date,
        n1,
        k1,
        n0,
        k0,
        *repeats,
    )
    return {
        "campaign": campaign,
        "score_date": score_date,
        "contacted": n1,
        "contacted_positives": k1,
        "control": n0,
        "control_positives": k0,
        "repeat_contacted": repeats[0],
        "repeat_control": repeats[1],
    } | _difference_of_rates(k1, n1, k0, n0)


def _difference_of_rates(k1: int, n1: int, k0: int, n0: int) -> dict[str, float | None]:
    """Rates k/n, uplift p0 - p1 and its Wald interval; None where a group is empty."""
    p1 = k1 / n1 if n1 else None
    p0 = k0 / n0 if n0 else None
    if p1 is None or p0 is None:
        return {
            "contacted_rate": p1,
            "control_rate": p0,
            "uplift": None,
            "ci_low": None,
            "ci_high": None,
        }
    z = NormalDist().inv_cdf(0.5 + UPLIFT_CONFIDENCE / 2)
    half = z * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    return {
        "contacted_rate": p1,
        "control_rate": p0,
        "uplift": p0 - p1,
        "ci_low": p0 - p1 - half,
        "ci_high": p0 - p1 + half,
    }


_UPLIFT_COLUMNS = (
    "campaign",
    "score_date",
    "contacted",
    "contacted_positives",
    "control",
    "control_positives",
    "contacted_rate",
    "control_rate",
    "uplift",
    "ci_low",
    "ci_high",
    "repeat_contacted",
    "repeat_control",
)


def _store_uplift(settings: Settings, uc: UseCase, rows: list[dict[str, Any]]) -> None:
    columns = ", ".join(_UPLIFT_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _UPLIFT_COLUMNS[1:])
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO monitoring.campaign_uplift (use_case, {columns}) "
                f"VALUES (%s, {', '.join(['%s'] * len(_UPLIFT_COLUMNS))}) "
                f"ON CONFLICT (use_case, campaign) DO UPDATE SET {updates}, evaluated_at = now()",
                [(uc.name, *(r[c] for c in _UPLIFT_COLUMNS)) for r in rows],
            )
        conn.commit()
    finally:
        conn.close()


def campaign_experiment(
    settings: Settings, uc: UseCase, matured_by: date | None = None
) -> dict[str, Any] | None:
    """Every measured campaign of ``uc`` (those matured by ``matured_by``, if given) pooled
    over weekly cohorts (``experiment.pooled``), with its sentence; None without a campaign."""
    from pipeline.campaigns import experiment

    if uc.campaign is None:
        return None
    matured = "" if matured_by is None else " AND score_date + CAST(:horizon AS integer) <= :by"
    rows = db.read_arrow(
        settings.database_url,
        "SELECT score_date, contacted, contacted_positives, control, control_positives "
        f"FROM monitoring.campaign_uplift WHERE use_case = :uc{matured}",
        {"uc": uc.name, "by": matured_by, "horizon": uc.label.horizon_days}
        if matured_by
        else {"uc": uc.name},
    ).to_pylist()
    out = experiment.pooled(rows)
    return out | {"text": experiment.pooled_text(out)}
