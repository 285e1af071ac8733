"""
### churn_nightly

Every night at 00:00 UTC: snapshot point-in-time features of every active customer as of
the run date (facts strictly before it), retrain a challenger on matured snapshots,
evaluate it against the champion on the same out-of-time holdout (promote on pass),
score the whole population in hash partitions with the one pinned model, and publish to
`predictions.churn_scores` atomically (COPY into staging, validate, swap the partition).

Trigger options (the form): **retrain**, **promotion_mode**, **rescore_model**, **dry_run**.
Each task calls one function of `pipeline.nightly`; see the README for the data flow.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.definitions.edges import Label

from pipeline.config import USE_CASES

USE_CASE = "churn"
SCORE_PARTITIONS = USE_CASES[USE_CASE].score_partitions
CHURN_SCORES = Asset(name="churn_scores", uri="nightscore://predictions/churn_scores")

IO_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}


@dag(
    dag_id="churn_nightly",
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2020, 1, 1),  # early, so backfills and `dags test` can reach any past date
    catchup=False,
    max_active_runs=1,
    tags=["nightscore", "churn"],
    doc_md=__doc__,
    params={
        "retrain": Param(
            True,
            type="boolean",
            description="Train a challenger tonight and evaluate it against the champion.",
        ),
        "promotion_mode": Param(
            "auto",
            enum=["auto", "never"],
            description="auto: promote a challenger that passes the gates; never: record the evaluation only.",
        ),
        "rescore_model": Param(
            "",
            type="string",
            description="Score with this registered model version instead of the champion (empty: the champion).",
        ),
        "dry_run": Param(
            False, type="boolean", description="Score and validate, but publish nothing."
        ),
    },
)
def churn_nightly():
    @task
    def start_run() -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.start_run(settings(), use_case(USE_CASE), run_context(ctx, USE_CASE))

    @task(**IO_RETRIES)
    def build_features(run: dict) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        return nightly.build_features(
            settings(), use_case(USE_CASE), run_context(get_current_context(), USE_CASE)
        )

    @task.branch
    def decide_retrain(params: dict | None = None) -> str:
        return "train_challenger" if params and params["retrain"] else "select_model"

    @task(**IO_RETRIES)
    def train_challenger() -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        return nightly.train_challenger(
            settings(), use_case(USE_CASE), run_context(get_current_context(), USE_CASE)
        )

    @task(retries=0)
    def evaluate_challenger(trained: dict, params: dict | None = None) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        mode = (params or {}).get("promotion_mode", "auto")
        return nightly.evaluate_challenger(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), trained, mode
        )

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def select_model(params: dict | None = None) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        rescore = (params or {}).get("rescore_model") or None
        return nightly.select_model(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), rescore
        )

    @task(**IO_RETRIES)
    def score_partition(partition: int, snapshot: dict, model: dict) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.score_partition(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            snapshot,
            model["model_version"],
            partition,
        )

    @task(outlets=[CHURN_SCORES], **IO_RETRIES)
    def publish_scores(
        snapshot: dict, model: dict, parts: list[dict], params: dict | None = None
    ) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.publish_scores(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            snapshot,
            model["model_version"],
            list(parts),
            dry_run=bool((params or {}).get("dry_run")),
        )

    run = start_run()
    snapshot = build_features(run)
    branch = decide_retrain()
    snapshot >> branch
    trained = train_challenger()
    evaluated = evaluate_challenger(trained)
    model = select_model()
    branch >> Label("retrain") >> trained
    branch >> Label("champion only") >> model
    evaluated >> model
    parts = score_partition.partial(snapshot=snapshot, model=model).expand(
        partition=list(range(SCORE_PARTITIONS))
    )
    publish_scores(snapshot, model, parts)


churn_nightly()
