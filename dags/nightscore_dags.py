"""
### nightscore: the DAGs of every use case

One factory for all use cases found in `usecases/` (or `$NIGHTSCORE_USECASES`): each gets
`<name>_nightly`, `<name>_monitoring` and, when its config has a campaign block,
`<name>_campaign`. Parsing reads the use case files only: no connection, no Variable, no
database. A use case whose config is invalid gets a `<name>_nightly` that explains the
error (and only fails), so the others keep running.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import (
    Asset,
    CronTriggerTimetable,
    DeadlineAlert,
    DeadlineReference,
    Param,
    SyncCallback,
    TaskGroup,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.definitions.edges import Label

from pipeline.conf import sections, usecase

START = datetime(2020, 1, 1)  # early, so backfills and `dags test` can reach any past date
TURN_POKE_SECONDS = 30  # a night waiting for another of its use case looks this often
TURN_WAIT_HOURS = 24  # and fails after this long
IO_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}


class ReviewedApproval(ApprovalOperator):
    """Airflow's approval, which also leaves the answer (chosen option, who, when) in the
    XCom ``hitl_response`` on Reject too: a rejection skips the tasks right after it
    before its own result is stored, and the task that records the decision needs it."""

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:
            at = event.get("responded_at")
            context["ti"].xcom_push(
                key="hitl_response",
                value={
                    "chosen_options": list(event.get("chosen_options") or []),
                    "responded_by_user": event.get("responded_by_user"),
                    "responded_at": at.isoformat() if hasattr(at, "isoformat") else at,
                },
            )
        return super().execute_complete(context, event)


def one_line(text: str) -> str:
    """The first line of a description (the DAG list shows one line)."""
    return text.strip().splitlines()[0] if text and text.strip() else ""


def scores_asset(uc: usecase.UseCase) -> Asset:
    """The Airflow asset a use case's publish updates (its campaign is scheduled on it)."""
    return Asset(name=uc.score_table, uri=f"nightscore://predictions/{uc.score_table}")


NIGHTLY_DOC = """
### {name}_nightly

{description}

Every night ({cron} {tz}): wait for the night's data to land (`wait_for_data`: the
contract's fresh tables through the day before; the night is skipped after
{wait:g} h; a past night does not wait), wait for the use case's turn (`wait_for_turn`:
one night of a use case at a time, backfills included), check the warehouse against the use case's source contract,
snapshot point-in-time features of the population as of the run date (facts strictly
before it), retrain a challenger on matured snapshots, evaluate it against the champion on
the same out-of-time holdout (promote on pass), score the whole population in hash
partitions with the one pinned model, and publish to `predictions.{table}` atomically
(COPY into staging, validate, swap the partition). Readers use
`predictions.{table}_latest` and `predictions.{table}_history`.

**Triggering a paused DAG.** A triggered run starts only once the DAG is unpaused, and the
trigger form ticks *Unpause {name}_nightly on trigger*: unpausing also starts, at once, the
night of the newest scheduled time already past (`{cron}` {tz}; catchup is off, so that one
only, and none if it has run), and the triggered run may queue behind it. Untick the box to
keep the run queued until you unpause. A run's *Run report* tab says what it waits for.

Trigger options (the form, which submits as it is): **retrain**, **promotion_mode**
(`approval` waits at `approve_promotion` for a person: pending approvals are listed under
*Browse → Required Actions*), **rescore_model**, **dry_run**. A challenger that is not
promoted goes through `keep_champion`, whose log says why, and is scored every night into
`predictions.{table}_shadow` (`score_shadow`). `write_report` runs whatever happened.
Configuration: `{source}`. Each task calls one function of `pipeline.run` (`nightly`,
`challenger`, `night_report`), found by its task id.
"""


def alert_failed(use_case: str, context: Any) -> None:
    """A failed night tells the use case's alert notifier (``pipeline.run.alerts``)."""
    from _nightscore import alert_failed as alert

    alert(use_case, context)


def night_deadline(uc: usecase.UseCase) -> DeadlineAlert | None:
    """A night not published ``schedule.deadline`` after it was queued tells the alert
    notifier (the scheduler finds the missed deadline; the executor runs the callback)."""
    after = uc.schedule.deadline_after
    if after is None:
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=after,
        callback=SyncCallback("_nightscore.alert_late", kwargs={"use_case": uc.name}),
        name=f"{uc.name} night published within {uc.schedule.deadline}",
    )


def tested_without_deadline(built: Any) -> Any:
    """``built`` whose ``test()`` (``airflow dags test``, a script's ``dag.test()``) runs
    without its deadline alert: Airflow 3.3's ``DAG.test`` keeps the alert's definition
    where the end of the run expects its id, and fails a run that succeeded. No scheduler
    watches deadlines there; the DAG processor serializes the DAG with it."""
    if not built.deadline:
        return built
    test = built.test

    def without_deadline(*args: Any, **kwargs: Any) -> Any:
        deadline, built.deadline = built.deadline, None
        try:
            return test(*args, **kwargs)
        finally:
            built.deadline = deadline

    built.test = without_deadline
    return built


def nightly_params(uc: usecase.UseCase) -> dict[str, Param]:
    """The trigger form of ``<name>_nightly``: typed, described, with the run's defaults."""
    name = uc.name
    return {
        "retrain": Param(
            "scheduled",
            enum=["scheduled", "always", "never"],
            description="scheduled: follow the use case's cadence (and retrain requests; "
            "never in backfills); always: train tonight; never: score with the champion. "
            f"If this DAG is paused: 'Unpause {name}_nightly on trigger' above also starts its "
            f"latest scheduled night (cron {uc.schedule.nightly} {uc.schedule.timezone}) now, "
            "unless it has run already, and this run may queue behind it; untick it to queue "
            "this run until the DAG is unpaused.",
        ),
        "promotion_mode": Param(
            "auto",
            enum=["auto", "approval", "never"],
            description="auto: promote a challenger that passes the gates; approval: ask a "
            "person in this UI; never: keep it as the shadow model.",
        ),
        "rescore_model": Param(
            None,
            type=["null", "string"],
            description="Score with this registered model version instead of the champion "
            "(empty: the champion).",
        ),
        "dry_run": Param(
            False, type="boolean", description="Score and validate, but publish nothing."
        ),
        "backfill_model": Param(
            "champion_on_date",
            enum=["champion_on_date", "current_champion"],
            description="In backfills: score each date with the model that was champion on "
            "that date (from the promotions log), or rescore every date with the current "
            "champion. In the Backfill form, tick 'Override parameters on existing runs' or "
            "Airflow sends none of these values (every run gets the defaults).",
        ),
    }


def nightly_dag(uc: usecase.UseCase) -> Any:
    """``<name>_nightly``: the night's tasks in five groups, the report as its teardown.

    The groups only draw the graph (collapsed, one node each); ``prefix_group_id=False``
    keeps every task id, which the branches, XCom pulls, report links and tests name.
    """
    name = uc.name

    @dag(
        dag_id=f"{name}_nightly",
        schedule=CronTriggerTimetable(uc.schedule.nightly, timezone=uc.schedule.timezone),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["nightscore", name],
        on_failure_callback=functools.partial(alert_failed, name),
        deadline=night_deadline(uc),
        description=one_line(uc.description)
        or f"Nightly scores of {name} into predictions.{uc.score_table}",
        doc_md=NIGHTLY_DOC.format(
            name=name,
            description=uc.description,
            cron=uc.schedule.nightly,
            tz=uc.schedule.timezone,
            table=uc.score_table,
            source=uc.source,
            wait=uc.schedule.data_wait_hours,
        ),
        params=nightly_params(uc),
    )
    def nightly() -> None:
        run, sources = sources_group(uc)
        snapshot, features_ok = features_group(uc, sources)
        model = model_group(uc, run, snapshot, features_ok)
        parts, scores_ok = scoring_group(uc, snapshot, model)
        shadow = publish_group(uc, snapshot, model, parts, scores_ok)
        shadow >> write_report_task(uc).as_teardown()

    return tested_without_deadline(nightly())


def sources_group(uc: usecase.UseCase) -> tuple[Any, Any]:
    """Wait for the data and the use case's turn, start the run, check the sources."""
    name = uc.name

    @task.sensor(
        poke_interval=uc.schedule.data_poke_minutes * 60,
        timeout=uc.schedule.data_wait_hours * 3600,
        mode="reschedule",
        soft_fail=True,
    )
    def wait_for_data() -> bool:
        """A night of today waits for its data (the contract's fresh tables through the
        day before), then is skipped if it never lands; a past night goes on at once."""
        from _nightscore import data_landed

        return data_landed(name)

    @task.sensor(poke_interval=TURN_POKE_SECONDS, timeout=TURN_WAIT_HOURS * 3600, mode="reschedule")
    def wait_for_turn() -> bool:
        """One night of the use case at a time: a run waits while another (scheduled,
        triggered or backfilled) holds the use case's turn; its log says which."""
        from _nightscore import take_turn

        return take_turn(name)

    @task
    def start_run(params: dict | None = None) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("start_run", name, dict(params or {}))

    @task(retries=0)
    def check_sources() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_sources", name)

    with TaskGroup("sources", prefix_group_id=False, tooltip="data landed, turn, sources"):
        run = start_run()
        wait_for_data() >> wait_for_turn() >> run
        sources = check_sources()
        run >> sources
    return run, sources


def features_group(uc: usecase.UseCase, sources: Any) -> tuple[Any, Any]:
    """Snapshot the features (after the sources' checks) and check them."""
    name = uc.name

    @task(**IO_RETRIES)
    def build_features() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("build_features", name)

    @task(retries=0)
    def check_features(snapshot: dict) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_features", name, snapshot)

    with TaskGroup("features", prefix_group_id=False, tooltip="snapshot and its checks"):
        snapshot = build_features()
        sources >> snapshot  # after start_run, through check_sources
        features_ok = check_features(snapshot)
    return snapshot, features_ok


def model_group(uc: usecase.UseCase, run: Any, snapshot: Any, features_ok: Any) -> Any:
    """Retrain or not; a challenger is evaluated, then promoted, approved first, or kept
    as the shadow; the night's model is selected. Returns ``select_model``."""
    name = uc.name

    @task.branch
    def decide_retrain(params: dict | None = None) -> str:
        from _nightscore import is_backfill, nightly_stage

        mode = (params or {}).get("retrain", "scheduled")
        decision = nightly_stage("decide_retrain", name, mode, backfill=is_backfill())
        return "train_challenger" if decision["retrain"] else "select_model"

    @task(**IO_RETRIES)
    def train_challenger() -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("train_challenger", name)

    @task(retries=0)
    def evaluate_challenger(trained: dict, snapshot: dict, params: dict | None = None) -> dict:
        from _nightscore import nightly_stage

        mode = (params or {}).get("promotion_mode", "auto")
        return nightly_stage("evaluate_challenger", name, trained, mode, snapshot)

    @task.branch
    def route_promotion(evaluation: dict) -> str:
        return {"awaiting_approval": "approve_promotion", "promote": "select_model"}.get(
            evaluation["decision"], "keep_champion"
        )

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def select_model(run: dict, params: dict | None = None) -> dict:
        from _nightscore import is_backfill, nightly_stage

        p = params or {}
        return nightly_stage(
            "select_model",
            name,
            p.get("rescore_model") or None,
            run["champion_at_start"],
            backfill=is_backfill(),
            backfill_model=p.get("backfill_model", "champion_on_date"),
        )

    with TaskGroup("model", prefix_group_id=False, tooltip="retrain, evaluate, promote"):
        branch = decide_retrain()
        features_ok >> branch
        trained = train_challenger()
        evaluation = evaluate_challenger(trained, snapshot)
        route = route_promotion(evaluation)
        approve_promotion = ReviewedApproval(
            task_id="approve_promotion",
            subject="Promote {{ ti.xcom_pull(task_ids='evaluate_challenger')['version'] }} "
            f"to {name} champion?",
            body=(f"{uc.description}\n\n" if uc.description else "")
            # the summary ends with a link to the evaluation report (served by the plugin)
            + "{{ ti.xcom_pull(task_ids='evaluate_challenger')['summary'] }}",
            response_timeout=timedelta(hours=12),
            defaults="Reject",
        )
        promoted, reviewed, kept = decision_tasks(uc, evaluation)
        model = select_model(run)
        branch >> Label("retrain") >> trained
        branch >> Label("champion only") >> model
        route >> Label("needs approval") >> approve_promotion >> Label("approved") >> promoted
        promoted >> reviewed >> model
        route >> Label("promoted") >> model
        route >> Label("not promoted") >> kept >> model
    return model


def decision_tasks(uc: usecase.UseCase, evaluation: Any) -> tuple[Any, Any, Any]:
    """What follows the evaluation's decision: an approved promotion, the review's record,
    or the champion kept (with why in the log)."""
    name = uc.name

    @task(retries=0)
    def promote_challenger(evaluation: dict) -> dict:
        from _nightscore import approver, nightly_stage

        return nightly_stage(
            "promote_challenger",
            name,
            evaluation["version"],
            actor=f"approval:{approver('approve_promotion')}",
            reason="approved in the Airflow UI after: " + "; ".join(evaluation["reasons"]),
        )

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def record_review(evaluation: dict) -> dict:
        """Approved or rejected: who and when, into ml.evaluations, the night's report and
        the run's note. Runs after a rejection too (which skips promote_challenger)."""
        from _nightscore import leave_note, nightly_stage, review_answer

        recorded = nightly_stage(
            "record_review", name, evaluation, review_answer("approve_promotion")
        )
        leave_note(recorded["note"])
        return recorded

    @task(retries=0)
    def keep_champion(evaluation: dict) -> dict:
        """The challenger was not promoted: say why where the run shows it."""
        import logging

        log = logging.getLogger("nightscore.keep_champion")
        if evaluation["decision"] == "identical":
            log.warning("challenger identical to the champion %s", evaluation["champion"])
        else:
            log.warning(
                "challenger %s not promoted (%s); %s stays champion and %s is the shadow model",
                evaluation["version"],
                evaluation["decision"],
                evaluation["champion"] or "no model",
                evaluation["version"],
            )
        for reason in evaluation["reasons"]:
            log.warning("  %s", reason)
        return {k: evaluation[k] for k in ("version", "decision", "reasons", "report_url")}

    return promote_challenger(evaluation), record_review(evaluation), keep_champion(evaluation)


def scoring_group(uc: usecase.UseCase, snapshot: Any, model: Any) -> tuple[Any, Any]:
    """Score the hash partitions (mapped, in the serving pool) and check the scores."""
    name = uc.name

    @task(pool=uc.serving.pool, **IO_RETRIES)
    def score_partition(partition: int, snapshot: dict, model: dict) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("score_partition", name, snapshot, model["model_version"], partition)

    @task(retries=0)
    def check_scores(parts: list[dict]) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("check_scores", name, list(parts))

    with TaskGroup("scoring", prefix_group_id=False, tooltip="score and check partitions"):
        parts = score_partition.partial(snapshot=snapshot, model=model).expand(
            partition=list(range(uc.serving.partitions))
        )
        scores_ok = check_scores(parts)
    return parts, scores_ok


def publish_group(
    uc: usecase.UseCase, snapshot: Any, model: Any, parts: Any, scores_ok: Any
) -> Any:
    """Publish the checked scores (updating the use case's asset), then score the shadow
    model. Returns ``score_shadow``."""
    name, asset = uc.name, scores_asset(uc)

    @task(outlets=[asset], **IO_RETRIES)
    def publish_scores(
        snapshot: dict, model: dict, parts: list[dict], params: dict | None = None
    ) -> dict:
        from _nightscore import is_backfill, nightly_stage

        dry_run = bool((params or {}).get("dry_run"))
        result = nightly_stage(
            "publish_scores", name, snapshot, model["model_version"], list(parts), dry_run=dry_run
        )
        # what the campaign (scheduled on this asset) needs to know about the publish
        get_current_context()["outlet_events"][asset].extra = {
            "score_date": snapshot["as_of"],
            "model_version": model["model_version"],
            "published": not dry_run,
            "backfill": is_backfill(),
        }
        return result

    @task(**IO_RETRIES)
    def score_shadow(snapshot: dict, model: dict, parts: list[dict]) -> dict:
        from _nightscore import nightly_stage

        return nightly_stage("score_shadow", name, snapshot, model["model_version"], list(parts))

    with TaskGroup("publish", prefix_group_id=False, tooltip="swap in, score the shadow"):
        published = publish_scores(snapshot, model, parts)
        scores_ok >> published
        shadow = score_shadow(snapshot, model, parts)
        published >> shadow
    return shadow


def write_report_task(uc: usecase.UseCase) -> Any:
    """The night's report, whatever happened to the night (the DAG's teardown)."""
    name = uc.name

    @task(retries=1)
    def write_report() -> dict:
        """The night's report, whatever happened to the night. A teardown: it runs once
        the others are done and does not decide the run's state, so a night stopped by a
        gate still shows as failed."""
        from _nightscore import give_turn_back, nightly_stage
        from airflow.sdk.exceptions import AirflowSkipException

        try:
            if get_current_context()["ti"].xcom_pull(task_ids="start_run") is None:
                raise AirflowSkipException("the night did not start: nothing to report")
            return nightly_stage("write_report", name)
        finally:
            give_turn_back(name)  # the next night of the use case may start

    return write_report()


MONITORING_DOC = """
### {name}_monitoring

Every day ({cron} {tz}): evaluate each published night of {name} whose labels have matured
({horizon} days after its score date) against what actually happened, by model version,
into `monitoring.realized_performance`. A realized AUC more than {decay} below the model's
own holdout AUC files a retrain request that the next `{name}_nightly` honours. Each
campaign whose labels have matured is measured once (contacted vs control band) into
`monitoring.campaign_uplift`. With a campaign, `train_policy` then trains an uplift policy
from the matured campaigns (with `policy.rank_by: uplift`), checks it out of time against
the policy in force (Qini, paired bootstrap) and promotes it, or waits at `approve_policy`
for a person, as the campaign's `policy.promotion_mode` says (`ml.policies`).
"""


def monitoring_dag(uc: usecase.UseCase) -> Any:
    name = uc.name
    retries = {"retries": 2, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True}

    @dag(
        dag_id=f"{name}_monitoring",
        schedule=CronTriggerTimetable(uc.schedule.monitoring, timezone=uc.schedule.timezone),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["nightscore", name, "monitoring"],
        description=f"Realized performance and campaign uplift of {name}, once labels mature",
        doc_md=MONITORING_DOC.format(
            name=name,
            cron=uc.schedule.monitoring,
            tz=uc.schedule.timezone,
            horizon=uc.label.horizon_days,
            decay=uc.monitoring.decay_threshold,
        ),
    )
    def monitoring() -> None:
        @task(**retries)
        def evaluate_realized_performance() -> dict:
            from _nightscore import record_run_page, use_case_context

            from pipeline.campaigns import monitor

            settings, config, day = use_case_context(name)
            out = monitor.update_realized_performance(settings, config, day)
            record_run_page(settings, name, "monitoring", [day])
            return out

        @task(**retries)
        def evaluate_campaign_uplift() -> list[dict]:
            from _nightscore import use_case_context

            from pipeline.campaigns import monitor

            settings, config, day = use_case_context(name)
            return monitor.update_campaign_uplift(settings, config, day)

        evaluate_realized_performance()
        measured = evaluate_campaign_uplift()
        if uc.campaign is not None:
            policy_tasks(uc, measured)

    return monitoring()


def policy_tasks(uc: usecase.UseCase, measured: Any) -> None:
    """Train an uplift policy from the measured campaigns; promote it, or ask a person
    first, as the campaign's ``policy.promotion_mode`` says."""
    name = uc.name

    @task(retries=0)
    def train_policy(measured: list[dict]) -> dict:
        """An uplift policy from the matured campaigns, checked out of time (pipeline.campaigns.policy_learning)."""
        from _nightscore import use_case_context

        from pipeline.campaigns import policy_learning

        settings, config, day = use_case_context(name)
        run_id = get_current_context()["dag_run"].run_id
        return policy_learning.train_challenger(settings, config, day, run_id)

    @task.branch
    def route_policy(trained: dict) -> str:
        return "approve_policy" if trained["decision"] == "awaiting_approval" else "policy_decided"

    @task(retries=0)
    def policy_decided(trained: dict) -> dict:
        """Say what became of the challenger (or why none was trained) where the run shows it."""
        from pipeline.campaigns import policy_learning

        policy_learning.log_outcome(trained)
        return {k: trained.get(k) for k in ("version", "decision", "why")}

    approve_policy = ReviewedApproval(
        task_id="approve_policy",
        subject="Rank " + name + "'s audience by uplift policy "
        "{{ ti.xcom_pull(task_ids='train_policy')['version'] }}?",
        body="{{ ti.xcom_pull(task_ids='train_policy')['summary'] }}",
        response_timeout=timedelta(hours=12),
        defaults="Reject",
    )

    @task(retries=0)
    def promote_policy(trained: dict) -> dict:
        from _nightscore import approver, use_case_context

        from pipeline.campaigns import policy

        settings, config, _ = use_case_context(name)
        previous = policy.promote(
            settings,
            config,
            trained["version"],
            actor=f"approval:{approver('approve_policy')}",
            reason="approved in the Airflow UI after: " + trained["summary"],
            run_id=get_current_context()["dag_run"].run_id,
        )
        return {"version": trained["version"], "previous": previous}

    @task(retries=0, trigger_rule="none_failed_min_one_success")
    def record_policy_review(trained: dict) -> dict:
        """Approved or rejected: who and when, into ml.policies and the run's note."""
        from _nightscore import leave_note, review_answer, use_case_context

        from pipeline.campaigns import policy

        settings, config, _ = use_case_context(name)
        recorded = policy.record_review(
            settings,
            config,
            trained,
            review_answer("approve_policy"),
            get_current_context()["dag_run"].run_id,
        )
        leave_note(recorded["note"])
        return recorded

    trained = train_policy(measured)
    route = route_policy(trained)
    (
        route
        >> Label("needs approval")
        >> approve_policy
        >> Label("approved")
        >> promote_policy(trained)
        >> record_policy_review(trained)
    )
    route >> Label("decided") >> policy_decided(trained)


CAMPAIGN_DOC = """
### {name}_campaign

Runs after every publish of `predictions.{table}` (scheduled on the `{table}` asset, so it
needs no clock of its own). `build_audience` writes `campaigns.{audience}` for each newly
published date: the top {deciles} risk decile(s), opted in, outside the permanent control
group and not contacted in the last {suppression} days, ranked by the policy in force (risk,
or the uplift policy `{name}_monitoring` promoted: `campaign.policy`), up to {capacity},
each with up to three reasons from the model; it exports the audience as CSV and Parquet. `send_emails`
renders `{template}` for each entity and sends it through the `nightscore_smtp`
connection, rate limited; **`dry_run` is on by default** (the messages go to files under
`$NIGHTSCORE_HOME/outbox/`). The send log's (campaign, entity) key means retries, re-runs
and backfills never email anyone twice; only the newest published date is ever emailed.

Trigger by hand with **score_date** to (re)build a given date's audience.
"""


def campaign_dag(uc: usecase.UseCase) -> Any:
    name, cfg = uc.name, uc.campaign
    assert cfg is not None

    @dag(
        dag_id=f"{name}_campaign",
        schedule=[scores_asset(uc)],
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["nightscore", name, "campaign"],
        description=f"Retention emails to the riskiest of each published {name} night",
        doc_md=CAMPAIGN_DOC.format(
            name=name,
            table=uc.score_table,
            audience=cfg.audience_table,
            deciles=cfg.audience_deciles,
            suppression=cfg.suppression_days,
            capacity=cfg.capacity,
            template=cfg.template.name,
        ),
        params={
            "score_date": Param(
                None,
                type=["null", "string"],
                format="date",
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
    def campaign() -> None:
        @task(retries=2, retry_delay=timedelta(minutes=1))
        def build_audience(params: dict | None = None) -> dict:
            from _nightscore import published_dates, record_run_page, settings

            from pipeline.campaigns import audience, campaign
            from pipeline.conf import usecase

            config = usecase.load(name)
            s = settings(config, require_serving=True)
            requested = (params or {}).get("score_date") or None
            announced = published_dates(get_current_context())
            if requested or not announced:  # by hand: that date, or the newest published one
                day = campaign.campaign_date(s, config, requested)
                built = audience.build_audience(s, config, day)
                out = {"score_date": built["score_date"], "built": [built], "skipped": []}
            else:
                out = audience.build_announced(s, config, announced)
            record_run_page(s, name, "campaign", [b["score_date"] for b in out["built"]])
            return out

        @task(retries=3, retry_delay=timedelta(minutes=2), retry_exponential_backoff=True)
        def send_emails(audience: dict, params: dict | None = None) -> dict:
            from _nightscore import settings, smtp_target

            from pipeline.campaigns import sending
            from pipeline.conf import usecase
            from pipeline.store import db

            config = usecase.load(name)
            p = params or {}
            dry_run = bool(p.get("dry_run", True))
            return sending.send_campaign(
                settings(config),
                config,
                db.to_date(audience["score_date"]),
                get_current_context()["dag_run"].run_id,
                target=None if dry_run else smtp_target(),
                dry_run=dry_run,
                rate_per_second=float(p.get("rate_per_second") or 0) or None,
            )

        send_emails(build_audience())

    return campaign()


def invalid_dag(found: usecase.Found) -> Any:
    """A stand-in for a use case whose config is invalid: it says why, and only fails.

    Named after the use case the file declares (else its folder), so it takes the place
    of the DAG people look for.
    """
    import re

    name = found.name if re.fullmatch(sections.IDENTIFIER, found.name) else "invalid_use_case"

    @dag(
        dag_id=f"{name}_nightly",
        schedule=None,
        start_date=START,
        catchup=False,
        tags=["nightscore", "invalid-config"],
        description=f"invalid config: {found.source}",
        doc_md=f"### invalid use case config\n\n```\n{found.error}\n```\n\nFix the file; "
        "`nightscore usecase list` shows the same message.",
    )
    def invalid() -> None:
        @task(retries=0)
        def check_use_case_config() -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(found.error))

        check_use_case_config()

    return invalid()


for _found in usecase.discover():
    if _found.use_case is None:
        invalid_dag(_found)
        continue
    nightly_dag(_found.use_case)
    monitoring_dag(_found.use_case)
    if _found.use_case.campaign is not None:
        campaign_dag(_found.use_case)
