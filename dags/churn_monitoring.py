"""
### churn_monitoring

Every day: evaluate each published churn night whose labels have matured (30 days after
its score date) against the actual cancellations, by model version, into
`monitoring.realized_performance`. A realized AUC that fell more than the use case's
`decay_threshold` below the model's own holdout AUC files a retrain request, which the
next `churn_nightly` run honours.

Alongside, each retention campaign whose labels have matured is measured once: churn of
the customers emailed vs the control band, with a 95% interval, in
`monitoring.campaign_uplift`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task

USE_CASE = "churn"


@dag(
    dag_id="churn_monitoring",
    schedule=CronTriggerTimetable("0 6 * * *", timezone="UTC"),
    start_date=datetime(2020, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["nightscore", "churn", "monitoring"],
    doc_md=__doc__,
)
def churn_monitoring():
    @task(retries=2, retry_delay=timedelta(minutes=5), retry_exponential_backoff=True)
    def evaluate_realized_performance() -> dict:
        from _nightscore import score_date, settings

        from pipeline import monitor
        from pipeline.config import use_case

        ctx = get_current_context()
        return monitor.update_realized_performance(settings(), use_case(USE_CASE), score_date(ctx))

    @task(retries=2, retry_delay=timedelta(minutes=5), retry_exponential_backoff=True)
    def evaluate_campaign_uplift() -> list[dict]:
        from _nightscore import score_date, settings

        from pipeline import monitor
        from pipeline.config import use_case

        ctx = get_current_context()
        return monitor.update_campaign_uplift(settings(), use_case(USE_CASE), score_date(ctx))

    evaluate_realized_performance()
    evaluate_campaign_uplift()


churn_monitoring()
