"""
### churn_campaign

Runs after every publish of churn scores (scheduled on the `churn_scores` asset, so it
needs no clock of its own). `build_audience` writes `campaigns.retention_audience` for each
newly published date: the top risk band, opted in, outside the permanent control group and
not contacted in the last 14 days, up to the campaign's capacity, each with up to three
reasons from the model; it exports the audience as CSV and Parquet. `send_emails` renders
the retention email for each customer and sends it through the `nightscore_smtp`
connection, rate limited; **`dry_run` is on by default** (the messages go to files under
`.nightscore/outbox/`). The send log's (campaign, customer) key means retries, re-runs and
backfills never email anyone twice; only the newest published date is ever emailed.

Trigger by hand with **score_date** to (re)build a given date's audience.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

from pipeline.config import SCORES_ASSET

USE_CASE = "churn"
CHURN_SCORES = Asset(
    name=SCORES_ASSET[USE_CASE], uri=f"nightscore://predictions/{SCORES_ASSET[USE_CASE]}"
)


@dag(
    dag_id="churn_campaign",
    schedule=[CHURN_SCORES],
    start_date=datetime(2020, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["nightscore", "churn", "campaign"],
    doc_md=__doc__,
    params={
        "score_date": Param(
            "",
            type="string",
            description="Build the audience of this published date (YYYY-MM-DD). Empty: the "
            "dates announced by the triggering publish, else the newest published date.",
        ),
        "dry_run": Param(
            True,
            type="boolean",
            description="Render the emails into files instead of sending them (the default).",
        ),
        "rate_per_second": Param(
            0.0,
            type="number",
            minimum=0,
            description="SMTP messages per second at most (0: the use case's default).",
        ),
    },
)
def churn_campaign():
    @task(retries=2, retry_delay=timedelta(minutes=1))
    def build_audience(params: dict | None = None) -> dict:
        from _nightscore import published_dates, settings

        from pipeline import campaign
        from pipeline.config import use_case

        uc, s = use_case(USE_CASE), settings()
        requested = (params or {}).get("score_date") or None
        announced = published_dates(get_current_context())
        if requested or not announced:  # by hand: that date, or the newest published one
            day = campaign.campaign_date(s, uc, requested)
            built = campaign.build_audience(s, uc, day)
            return {"score_date": built["score_date"], "built": [built], "skipped": []}
        return campaign.build_announced(s, uc, announced)

    @task(retries=3, retry_delay=timedelta(minutes=2), retry_exponential_backoff=True)
    def send_emails(audience: dict, params: dict | None = None) -> dict:
        from _nightscore import settings, smtp_target

        from pipeline import campaign, db
        from pipeline.config import use_case

        ctx = get_current_context()
        p = params or {}
        dry_run = bool(p.get("dry_run", True))
        return campaign.send_campaign(
            settings(),
            use_case(USE_CASE),
            db.to_date(audience["score_date"]),
            ctx["dag_run"].run_id,
            target=None if dry_run else smtp_target(),
            dry_run=dry_run,
            rate_per_second=float(p.get("rate_per_second") or 0) or None,
        )

    send_emails(build_audience())


churn_campaign()
