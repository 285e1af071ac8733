"""
### churn_nightly

Every night at 00:00 UTC: check the sources against their contract, snapshot point-in-time features of every active customer as of
the run date (facts strictly before it), retrain a challenger on matured snapshots,
evaluate it against the champion on the same out-of-time holdout (promote on pass),
score the whole population in hash partitions with the one pinned model, and publish to
`predictions.churn_scores` atomically (COPY into staging, validate, swap the partition).

Trigger options (the form): **retrain**, **promotion_mode** (`approval` waits at
`approve_promotion` for a person), **rescore_model**, **dry_run**. A challenger that is not
promoted is scored every night into `predictions.churn_scores_shadow` (`score_shadow`).
Each task calls one function of `pipeline.nightly`; see the README for the data flow.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
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
            "scheduled",
            enum=["scheduled", "always", "never"],
            description="scheduled: follow the use case's cadence (and retrain requests; never in "
            "backfills); always: train tonight; never: score with the champion.",
        ),
        "promotion_mode": Param(
            "auto",
            enum=["auto", "approval", "never"],
            description="auto: promote a challenger that passes the gates; approval: ask a person in "
            "this UI; never: keep it as the shadow model.",
        ),
        "rescore_model": Param(
            "",
            type="string",
            description="Score with this registered model version instead of the champion (empty: the champion).",
        ),
        "dry_run": Param(
            False, type="boolean", description="Score and validate, but publish nothing."
        ),
        "backfill_model": Param(
            "champion_on_date",
            enum=["champion_on_date", "current_champion"],
            description="In backfills: score each date with the model that was champion on that date "
            "(from the promotions log), or rescore every date with the current champion.",
        ),
    },
)
def churn_nightly():
    @task
    def start_run(params: dict | None = None) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.start_run(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), dict(params or {})
        )

    @task(retries=0)
    def check_sources() -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.check_sources(settings(), use_case(USE_CASE), run_context(ctx, USE_CASE))

    @task(retries=0)
    def check_features(snapshot: dict) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.check_features(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), snapshot
        )

    @task(retries=0)
    def check_scores(parts: list[dict]) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.check_scores(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), list(parts)
        )

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
        from _nightscore import is_backfill, run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        decision = nightly.decide_retrain(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            (params or {}).get("retrain", "scheduled"),
            backfill=is_backfill(ctx),
        )
        return "train_challenger" if decision["retrain"] else "select_model"

    @task(**IO_RETRIES)
    def train_challenger() -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        return nightly.train_challenger(
            settings(), use_case(USE_CASE), run_context(get_current_context(), USE_CASE)
        )

    @task(retries=0)
    def evaluate_challenger(trained: dict, snapshot: dict, params: dict | None = None) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        mode = (params or {}).get("promotion_mode", "auto")
        return nightly.evaluate_challenger(
            settings(), use_case(USE_CASE), run_context(ctx, USE_CASE), trained, mode, snapshot
        )

    @task.branch
    def route_promotion(evaluation: dict) -> str:
        return (
            "approve_promotion" if evaluation["decision"] == "awaiting_approval" else "select_model"
        )

    approve_promotion = ApprovalOperator(
        task_id="approve_promotion",
        subject="Promote {{ ti.xcom_pull(task_ids='evaluate_challenger')['version'] }} to churn champion?",
        body="{{ ti.xcom_pull(task_ids='evaluate_challenger')['summary'] }}\n\n"
        "Report: {{ ti.xcom_pull(task_ids='evaluate_challenger')['report'] }}",
        response_timeout=timedelta(hours=12),
        defaults="Reject",
    )

    @task(retries=0)
    def promote_challenger(evaluation: dict) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        answer = ctx["ti"].xcom_pull(task_ids="approve_promotion") or {}
        who = (answer.get("responded_by_user") or {}).get("name") or "unknown"
        return nightly.promote_challenger(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            evaluation["version"],
            actor=f"approval:{who}",
            reason="approved in the Airflow UI after: " + "; ".join(evaluation["reasons"]),
        )

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def select_model(run: dict, params: dict | None = None) -> dict:
        from _nightscore import is_backfill, run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        p = params or {}
        return nightly.select_model(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            p.get("rescore_model") or None,
            run["champion_at_start"],
            backfill=is_backfill(ctx),
            backfill_model=p.get("backfill_model", "champion_on_date"),
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

    @task(**IO_RETRIES)
    def score_shadow(snapshot: dict, model: dict, parts: list[dict]) -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.score_shadow(
            settings(),
            use_case(USE_CASE),
            run_context(ctx, USE_CASE),
            snapshot,
            model["model_version"],
            list(parts),
        )

    @task(retries=1, trigger_rule="all_done")
    def write_report() -> dict:
        from _nightscore import run_context, settings

        from pipeline import nightly
        from pipeline.config import use_case

        ctx = get_current_context()
        return nightly.write_report(settings(), use_case(USE_CASE), run_context(ctx, USE_CASE))

    run = start_run()
    sources = check_sources()
    run >> sources
    snapshot = build_features(run)
    sources >> snapshot
    features_ok = check_features(snapshot)
    branch = decide_retrain()
    features_ok >> branch
    trained = train_challenger()
    evaluation = evaluate_challenger(trained, snapshot)
    route = route_promotion(evaluation)
    promoted = promote_challenger(evaluation)
    model = select_model(run)
    branch >> Label("retrain") >> trained
    branch >> Label("champion only") >> model
    route >> Label("needs approval") >> approve_promotion >> Label("approved") >> promoted >> model
    route >> Label("decided") >> model
    parts = score_partition.partial(snapshot=snapshot, model=model).expand(
        partition=list(range(SCORE_PARTITIONS))
    )
    scores_ok = check_scores(parts)
    published = publish_scores(snapshot, model, parts)
    scores_ok >> published
    published >> score_shadow(snapshot, model, parts) >> write_report()


churn_nightly()
