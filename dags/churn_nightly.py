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

from pipeline.config import SCORES_ASSET, USE_CASES

USE_CASE = "churn"
SCORE_PARTITIONS = USE_CASES[USE_CASE].score_partitions
CHURN_SCORES = Asset(
    name=SCORES_ASSET[USE_CASE], uri=f"nightscore://predictions/{SCORES_ASSET[USE_CASE]}"
)

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
        from _nightscore import nightly_stage

        return nightly_stage("start_run", USE_CASE, dict(params or {}))

    @task(retries=0)
    def check_sources() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_sources", USE_CASE)

    @task(retries=0)
    def check_features(snapshot: dict) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_features", USE_CASE, snapshot)

    @task(retries=0)
    def check_scores(parts: list[dict]) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_scores", USE_CASE, list(parts))

    @task(**IO_RETRIES)
    def build_features(run: dict) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("build_features", USE_CASE)

    @task.branch
    def decide_retrain(params: dict | None = None) -> str:
        from _nightscore import is_backfill, nightly_stage

        mode = (params or {}).get("retrain", "scheduled")
        decision = nightly_stage("decide_retrain", USE_CASE, mode, backfill=is_backfill())
        return "train_challenger" if decision["retrain"] else "select_model"

    @task(**IO_RETRIES)
    def train_challenger() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("train_challenger", USE_CASE)

    @task(retries=0)
    def evaluate_challenger(trained: dict, snapshot: dict, params: dict | None = None) -> dict:
        from _nightscore import nightly_stage

        mode = (params or {}).get("promotion_mode", "auto")
        return nightly_stage("evaluate_challenger", USE_CASE, trained, mode, snapshot)

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
        from _nightscore import nightly_stage

        answer = get_current_context()["ti"].xcom_pull(task_ids="approve_promotion") or {}
        who = (answer.get("responded_by_user") or {}).get("name") or "unknown"
        return nightly_stage(
            "promote_challenger",
            USE_CASE,
            evaluation["version"],
            actor=f"approval:{who}",
            reason="approved in the Airflow UI after: " + "; ".join(evaluation["reasons"]),
        )

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def select_model(run: dict, params: dict | None = None) -> dict:
        from _nightscore import is_backfill, nightly_stage

        p = params or {}
        return nightly_stage(
            "select_model",
            USE_CASE,
            p.get("rescore_model") or None,
            run["champion_at_start"],
            backfill=is_backfill(),
            backfill_model=p.get("backfill_model", "champion_on_date"),
        )

    @task(**IO_RETRIES)
    def score_partition(partition: int, snapshot: dict, model: dict) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage(
            "score_partition", USE_CASE, snapshot, model["model_version"], partition
        )

    @task(outlets=[CHURN_SCORES], **IO_RETRIES)
    def publish_scores(
        snapshot: dict, model: dict, parts: list[dict], params: dict | None = None
    ) -> dict:
        from _nightscore import is_backfill, nightly_stage

        dry_run = bool((params or {}).get("dry_run"))
        result = nightly_stage(
            "publish_scores",
            USE_CASE,
            snapshot,
            model["model_version"],
            list(parts),
            dry_run=dry_run,
        )
        # what churn_campaign (scheduled on this asset) needs to know about the publish
        get_current_context()["outlet_events"][CHURN_SCORES].extra = {
            "score_date": snapshot["as_of"],
            "model_version": model["model_version"],
            "published": not dry_run,
            "backfill": is_backfill(),
        }
        return result

    @task(**IO_RETRIES)
    def score_shadow(snapshot: dict, model: dict, parts: list[dict]) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage(
            "score_shadow", USE_CASE, snapshot, model["model_version"], list(parts)
        )

    @task(retries=1, trigger_rule="all_done")
    def write_report() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("write_report", USE_CASE)

    @task(retries=0, trigger_rule="one_failed")
    def fail_the_run() -> None:
        """Runs only when a task failed, and fails, so the run shows as failed in the UI.

        ``write_report`` runs whatever happened (``all_done``) and would otherwise be the
        only leaf: a night stopped by a gate would look like a successful run.
        """
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            "a task of this run failed (see its log); the reason is also in ml.runs.error"
        )

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
    shadow = score_shadow(snapshot, model, parts)
    report = write_report()
    published >> shadow >> report
    # not approve_promotion: a "Reject" skips its direct downstream tasks, and a failed
    # approval still reaches the watcher through promote_challenger (upstream_failed)
    every_task = [run, sources, snapshot, features_ok, branch, trained, evaluation, route]
    every_task += [promoted, model, parts, scores_ok, published, shadow, report]
    every_task >> fail_the_run()


churn_nightly()
