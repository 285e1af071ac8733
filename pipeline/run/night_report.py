"""The night's HTML report (the ``write_report`` task): what ran and was published, the
shadow and segment views of tonight's scores, the campaign's state and the realized
performance of earlier nights, gathered from the ledger and the served tables.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import date
from typing import Any

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core.faults import fault_point
from pipeline.reports import report_site
from pipeline.stages import checks
from pipeline.store import db, ledger
from pipeline.store.ledger import RunContext

log = logging.getLogger(__name__)

REPORT_CAMPAIGNS = 10  # newest campaign uplifts shown in the nightly report
REPORT_SAMPLE_ROWS = 200_000  # published scores read for the report's segment view, at most
REPORT_SEGMENT_VALUES = 20  # most frequent values shown per segment column


def write_report(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """The night's HTML report: score distribution, drift, checks, realized performance.

    Also the newest ``REPORT_CAMPAIGNS`` campaign uplifts whose labels matured by the night.
    A report that cannot be written fails the run, never un-serves the night.
    """
    with ledger.stage(settings, run, "write_report") as info:
        fault_point("write_report")
        path = _night_report(settings, uc, run)
        info["report"] = str(path)
    log.info(
        "nightly report: file://%s (Airflow UI: <base_url>/%s)",
        path,
        report_site.report_path(uc.name, run.score_date),
    )
    return {"report": str(path)}


@dataclass(frozen=True)
class _Recorded:
    """What the serving database holds of a night when its report is written."""

    run: dict[str, Any] | None  # the run's ledger row
    served: dict[str, Any] | None  # what readers get now (the *_latest views)
    published: dict[str, Any] | None  # what this date has published
    evaluation: dict[str, Any] | None
    previous_night: date | None
    newest_attempt: int | None
    shadow: list[dict[str, Any]]
    drift: list[tuple[str, float, bool]]
    checks: list[dict[str, Any]]
    uplift: list[dict[str, Any]]


def _first(cur: Any, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
    cur.execute(query, params)
    return next(iter(db.dict_rows(cur)), None)


def _recorded(settings: Settings, uc: UseCase, run: RunContext) -> _Recorded:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            ledger_row = _first(
                cur,
                "SELECT run_id, attempt, status, error, stages, snapshot_sha256, code_version, "
                "model_version, rows_published FROM ml.runs WHERE use_case = %s AND run_id = %s",
                (uc.name, run.run_id),
            )
            served = _first(
                cur,
                "SELECT score_date, model_version, run_id, rows FROM ml.publications "
                "WHERE use_case = %s ORDER BY score_date DESC LIMIT 1",
                (uc.name,),
            )
            published = _first(
                cur,
                "SELECT score_date, model_version, run_id, rows FROM ml.publications "
                "WHERE use_case = %s AND score_date = %s",
                (uc.name, run.score_date),
            )
            evaluation = _first(
                cur,
                "SELECT challenger, decision, reasons, reviewed_by, reviewed_at FROM ml.evaluations "
                "WHERE use_case = %s AND run_id = %s "
                "ORDER BY created_at DESC LIMIT 1",
                (uc.name, run.run_id),
            )
            cur.execute(
                "SELECT max(score_date) FROM ml.runs WHERE use_case = %s AND score_date < %s",
                (uc.name, run.score_date),
            )
            previous_night = cur.fetchone()[0]
            cur.execute(
                "SELECT max(attempt) FROM ml.runs WHERE use_case = %s AND score_date = %s",
                (uc.name, run.score_date),
            )
            newest_attempt = cur.fetchone()[0]
            cur.execute(
                "SELECT shadow, champion, rows, spearman, top_decile_overlap, audience_capacity, "
                "audience_enter, audience_leave FROM monitoring.shadow_agreement "
                "WHERE use_case = %s AND score_date = %s ORDER BY recorded_at DESC",
                (uc.name, run.score_date),
            )
            shadow = db.dict_rows(cur)
            cur.execute(
                "SELECT feature, psi, within_limit FROM monitoring.drift WHERE run_id = %s",
                (run.run_id,),
            )
            drift = [(str(f), float(p), bool(ok)) for f, p, ok in cur.fetchall()]
            cur.execute(
                "SELECT check_name, target, severity, passed, expected, found FROM monitoring.checks "
                "WHERE run_id = %s",
                (run.run_id,),
            )
            found_checks = db.dict_rows(cur)
            # matured by this night: a backfilled or rewritten report shows no later campaign
            cur.execute(
                "SELECT campaign, score_date, contacted, contacted_positives, control, control_positives, "
                "contacted_rate, control_rate, uplift, ci_low, ci_high FROM monitoring.campaign_uplift "
                "WHERE use_case = %s AND score_date + %s <= %s "
                "ORDER BY score_date DESC, campaign DESC LIMIT %s",
                (uc.name, uc.label.horizon_days, run.score_date, REPORT_CAMPAIGNS),
            )
            uplift = db.dict_rows(cur)
        conn.commit()
    finally:
        conn.close()
    return _Recorded(
        run=ledger_row,
        served=served,
        published=published,
        evaluation=evaluation,
        previous_night=previous_night,
        newest_attempt=newest_attempt,
        shadow=shadow,
        drift=drift,
        checks=found_checks,
        uplift=uplift,
    )


def _night_report(settings: Settings, uc: UseCase, run: RunContext) -> Any:
    from pipeline.reports import run_report

    found = _recorded(settings, uc, run)
    from pipeline.campaigns import monitor

    realized = monitor.matured_performance(settings, uc, run.score_date)
    segments, segment_note = _segment_scores(settings, uc, run, found.run, found.published)
    context = run_report.NightContext(
        run=found.run,
        served=found.served,
        published=found.published,
        evaluation=found.evaluation,
        previous_night=found.previous_night,
        shadow=found.shadow,
        segments=segments,
        segment_note=segment_note,
        decay_threshold=uc.monitoring.decay_threshold,
        airflow_run=report_site.airflow_run_path(uc.name, run.run_id),
        campaign=_campaign_state(settings, uc, run.score_date),
    )
    # each attempt of a date keeps its report; the date's own file is its newest attempt's
    attempt = found.run["attempt"] if found.run else None
    written = run_report.write_run_report(
        report_site.night_file(settings, uc.name, run.score_date, attempt),
        use_case=uc.name,
        score_date=run.score_date,
        model_version=found.run["model_version"] if found.run else None,
        score_hist=checks.score_histogram(settings, uc, run.score_date),
        previous_hist=checks.previous_score_histogram(settings, uc, run.score_date),
        drift=found.drift,
        checks=found.checks,
        realized=realized,
        decile_rates=realized[-1]["decile_rates"] if realized else None,
        uplift=found.uplift,
        context=context,
    )
    if attempt is None:  # a run outside the ledger: the date's file is its only one
        return written
    if attempt == found.newest_attempt:
        newest = report_site.night_file(settings, uc.name, run.score_date)
        part = newest.with_name(newest.name + ".part")
        shutil.copyfile(written, part)
        part.replace(newest)  # readers see the previous file or this one, never half of one
    return written


def _campaign_state(settings: Settings, uc: UseCase, night: date) -> dict[str, str] | None:
    """The report's sentences on the campaign as an experiment, as of ``night`` (None
    without a campaign)."""
    from pipeline.campaigns import experiment, monitor, policy

    pooled = monitor.campaign_experiment(settings, uc, matured_by=night)
    if uc.campaign is None or pooled is None:
        return None
    return {
        "pooled": pooled["text"],
        "plan": experiment.plan_text(experiment.plan_of(uc.campaign)),
        "policy": policy.policy_text(settings, uc),
    }


def _segment_scores(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    ledger_row: dict[str, Any] | None,
    published: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], str]:
    """Scores per value of each ``report.segments`` column, on a bounded sample of the night.

    The published scores of the date (a deterministic hash sample of at most
    ``REPORT_SAMPLE_ROWS`` entities, chosen in SQL) joined with the segment columns of the
    run's feature snapshot. Returns (rows, a note saying what was sampled or why nothing is shown).
    """
    import pyarrow.parquet as pq
    from psycopg2 import sql

    if not uc.report.segments:
        return [], "no segment columns configured (report.segments in the use case's config)"
    if published is None:
        return [], f"no scores of {run.score_date} are published: no segment view"
    sha = (ledger_row or {}).get("snapshot_sha256")
    snapshot = (
        settings.snapshots
        / uc.name
        / "features"
        / f"as_of={run.score_date}"
        / f"{str(sha)[:16]}.parquet"
    )
    if not sha or not snapshot.is_file():
        return [], "the night's feature snapshot is gone: no segment view"
    schema = pq.read_schema(snapshot)
    wanted = [c for c in uc.report.segments if c in schema.names]
    missing = [c for c in uc.report.segments if c not in schema.names]
    if not wanted:
        return [], f"segment columns {missing} are not features of the snapshot"
    stride = max(1, -(-int(published["rows"]) // REPORT_SAMPLE_ROWS))
    query = sql.SQL(
        "SELECT {key} AS key, {prob} AS probability, risk_decile FROM predictions.{table} "
        "WHERE score_date = %(d)s AND mod(abs(hashtext({key}::text)), %(stride)s) = 0"
    ).format(
        key=sql.Identifier(uc.entity_key),
        prob=sql.Identifier(uc.probability_column),
        table=sql.Identifier(uc.score_table),
    )
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, {"d": run.score_date, "stride": stride})
            scored = cur.fetchall()
        conn.commit()
    finally:
        conn.close()
    if not scored:
        return [], "no published scores in the sample"
    import numpy as np
    import pandas as pd

    scores = pd.DataFrame(scored, columns=["key", "probability", "risk_decile"])
    features_table = pq.read_table(snapshot, columns=[uc.entity_key, *wanted])
    frame = features_table.to_pandas().rename(columns={uc.entity_key: "key"})
    frame["key"] = frame["key"].astype(scores["key"].dtype, copy=False)
    joined = scores.merge(frame, on="key", how="inner")
    joined["top"] = (joined["risk_decile"] == 1).astype(np.float64)
    out: list[dict[str, Any]] = []
    for column in wanted:
        groups = joined.groupby(joined[column].astype("string").fillna("(missing)"), sort=False)
        table = groups.agg(
            rows=("probability", "size"), mean=("probability", "mean"), top=("top", "mean")
        ).sort_values("rows", ascending=False)
        for value, r in table.head(REPORT_SEGMENT_VALUES).iterrows():
            out.append(
                {
                    "segment": column,
                    "value": value,
                    "rows": int(r["rows"]),
                    "share": float(r["rows"]) / len(joined),
                    "mean": float(r["mean"]),
                    "top_decile_share": float(r["top"]),
                }
            )
    sampled = "all" if stride == 1 else f"a 1-in-{stride} hash sample of the"
    note = f"{sampled} {len(joined):,} published scores of {run.score_date}"
    if missing:
        note += f"; not features of the snapshot: {', '.join(missing)}"
    return out, note
