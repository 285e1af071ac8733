"""The DAG folder parses cleanly, fast, without touching connections, with the expected shape."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag(monkeypatch_module: pytest.MonkeyPatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Variable

    def forbidden(*args, **kwargs):
        raise AssertionError("a connection or Variable was fetched while parsing the DAGs")

    monkeypatch_module.setattr(BaseHook, "get_connection", classmethod(forbidden))
    monkeypatch_module.setattr(Variable, "get", staticmethod(forbidden))
    began = time.monotonic()
    bag = DagBag(dag_folder=str(DAGS))
    bag.parse_seconds = time.monotonic() - began  # type: ignore[attr-defined]
    return bag


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"churn_nightly", "churn_monitoring", "churn_campaign"} <= set(dagbag.dag_ids)


def test_one_factory_emits_every_use_case_and_a_campaign_only_where_configured(dagbag) -> None:
    from pipeline.conf import usecase

    for uc in usecase.load_all():
        assert {f"{uc.name}_nightly", f"{uc.name}_monitoring"} <= set(dagbag.dag_ids)
        assert (f"{uc.name}_campaign" in dagbag.dag_ids) == (uc.campaign is not None)
        nightly = dagbag.dags[f"{uc.name}_nightly"]
        assert uc.name in nightly.tags and f"predictions.{uc.score_table}" in nightly.doc_md
        outlets = nightly.get_task("publish_scores").outlets
        assert [o.name for o in outlets] == [uc.score_table]
        approval = nightly.get_task("approve_promotion")
        assert f"to {uc.name} champion?" in approval.subject
    assert "late_payment_campaign" not in dagbag.dag_ids


def test_an_invalid_use_case_gets_a_dag_that_explains_and_the_others_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    repo = DAGS.parent / "usecases"
    shutil.copytree(repo / "churn", tmp_path / "churn")
    shutil.copytree(repo / "late_payment", tmp_path / "broken")
    text = (tmp_path / "broken" / "usecase.yaml").read_text()
    (tmp_path / "broken" / "usecase.yaml").write_text(
        text.replace("horizon_days: 30", "horizon_days: soon")
    )
    monkeypatch.setenv("NIGHTSCORE_USECASES", str(tmp_path))
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert {"churn_nightly", "churn_monitoring", "churn_campaign", "late_payment_nightly"} == set(
        bag.dag_ids
    )
    stand_in = bag.dags["late_payment_nightly"]
    assert "invalid-config" in stand_in.tags
    assert type(stand_in.timetable).__name__ == "NullTimetable"
    assert "label.horizon_days" in stand_in.doc_md and "soon" in stand_in.doc_md
    assert [t.task_id for t in stand_in.tasks] == ["check_use_case_config"]


def test_parsing_is_fast(dagbag) -> None:
    assert dagbag.parse_seconds < 10  # benchmarks/dag_parse.py measures 1 and 10 use cases


def test_churn_nightly_tasks_and_edges(dagbag) -> None:
    dag = dagbag.dags["churn_nightly"]
    assert set(dag.task_ids) == {
        "wait_for_data",
        "wait_for_turn",
        "start_run",
        "build_features",
        "decide_retrain",
        "train_challenger",
        "evaluate_challenger",
        "route_promotion",
        "approve_promotion",
        "promote_challenger",
        "record_review",
        "keep_champion",
        "select_model",
        "score_partition",
        "publish_scores",
        "score_shadow",
        "check_sources",
        "check_features",
        "check_scores",
        "write_report",
    }
    down = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    # no task fans into a watcher: the widest fan-in is select_model (run + 4 branches)
    assert max(len(t.upstream_task_ids) for t in dag.tasks) <= 5
    assert down["wait_for_data"] == {"wait_for_turn"}
    assert down["wait_for_turn"] == {"start_run"}
    assert down["start_run"] == {"check_sources", "select_model"}
    assert down["check_sources"] == {"build_features"}
    assert down["build_features"] >= {"check_features"}
    assert down["check_features"] == {"decide_retrain"}
    assert down["check_scores"] == {"publish_scores"}
    assert down["decide_retrain"] == {"train_challenger", "select_model"}
    assert down["train_challenger"] == {"evaluate_challenger"}
    assert down["evaluate_challenger"] == {
        "route_promotion",
        "promote_challenger",
        "record_review",
        "keep_champion",
    }
    assert down["route_promotion"] == {"approve_promotion", "select_model", "keep_champion"}
    # a rejection skips what follows the approval directly; the review is recorded after it
    assert down["approve_promotion"] == {"promote_challenger"}
    assert down["promote_challenger"] == {"record_review"}
    assert down["record_review"] == {"select_model"}
    assert down["keep_champion"] == {"select_model"}
    assert "score_partition" in down["select_model"] and "score_partition" in down["build_features"]
    assert down["score_partition"] == {"check_scores", "publish_scores", "score_shadow"}
    assert down["publish_scores"] == {"score_shadow"}
    assert down["score_shadow"] == {"write_report"}
    # the report runs whatever happened, as a teardown: the run's state is decided by the
    # other tasks, so a night stopped by a gate shows as failed
    report = dag.get_task("write_report")
    assert report.is_teardown and not report.on_failure_fail_dagrun
    assert [t.task_id for t in dag.leaves] == ["write_report"]
    assert dag.get_task("select_model").trigger_rule == "none_failed_min_one_success"
    assert type(dag.get_task("approve_promotion")).__name__ == "ReviewedApproval"
    assert dag.get_task("record_review").trigger_rule == "none_failed_min_one_success"
    sensor = dag.get_task("wait_for_data")
    assert sensor.mode == "reschedule" and sensor.soft_fail
    assert sensor.timeout == 12 * 3600 and sensor.poke_interval == 600


def test_churn_nightly_draws_its_tasks_in_groups_and_keeps_their_ids(dagbag) -> None:
    """The graph collapses into five stages; the task ids (which branches return, XCom
    pulls and report links name) carry no group prefix."""
    dag = dagbag.dags["churn_nightly"]
    groups = {t.task_id: t.task_group.group_id for t in dag.tasks}
    assert groups == {
        "wait_for_data": "sources",
        "wait_for_turn": "sources",
        "start_run": "sources",
        "check_sources": "sources",
        "build_features": "features",
        "check_features": "features",
        "decide_retrain": "model",
        "train_challenger": "model",
        "evaluate_challenger": "model",
        "route_promotion": "model",
        "approve_promotion": "model",
        "promote_challenger": "model",
        "record_review": "model",
        "keep_champion": "model",
        "select_model": "model",
        "score_partition": "scoring",
        "check_scores": "scoring",
        "publish_scores": "publish",
        "score_shadow": "publish",
        "write_report": None,
    }
    # the stages follow one another: no group depends on a later one
    order = ["sources", "features", "model", "scoring", "publish", None]
    for t in dag.tasks:
        for d in t.downstream_task_ids:
            assert order.index(groups[d]) >= order.index(groups[t.task_id]), (t.task_id, d)


def test_every_trigger_form_submits_with_its_defaults(dagbag) -> None:
    """The trigger form treats an empty text field as a missing value: an optional field
    must default to None and accept null, else Trigger stays disabled."""
    for dag_id, dag in dagbag.dags.items():
        dag.params.validate()  # the defaults pass the JSON schema
        for key, param in dag.params.items():
            kinds = param.schema.get("type", [])
            kinds = [kinds] if isinstance(kinds, str) else kinds
            if param.value in ("", None):
                assert "null" in kinds, f"{dag_id}: param {key} has an empty default"
        described = [dag.description or ""]
        assert described[0] and "\n" not in described[0], f"{dag_id}: a one-line description"


def test_the_trigger_form_says_what_unpausing_starts(dagbag) -> None:
    """Airflow's form ticks 'Unpause <dag> on trigger' for a paused DAG; the first field's
    description (shown under it) and the DAG's doc say what that starts."""
    dag = dagbag.dags["churn_nightly"]
    first = dag.params.get_param(next(iter(dag.params)))
    assert "'Unpause churn_nightly on trigger' above" in first.description
    assert "latest scheduled night (cron 0 0 * * * UTC)" in first.description
    assert "Unpause churn_nightly on trigger" in dag.doc_md and "`0 0 * * *` UTC" in dag.doc_md


def test_schedule_and_run_policy(dagbag) -> None:
    dag = dagbag.dags["churn_nightly"]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.params["retrain"] == "scheduled"
    assert dag.params["promotion_mode"] == "auto"
    assert dag.params["rescore_model"] is None
    assert dag.params["dry_run"] is False


@pytest.mark.parametrize(
    "task_id", ["build_features", "train_challenger", "score_partition", "publish_scores"]
)
def test_io_tasks_retry_with_backoff(dagbag, task_id: str) -> None:
    task = dagbag.dags["churn_nightly"].get_task(task_id)
    assert task.retries >= 2 and task.retry_exponential_backoff


@pytest.mark.parametrize(
    "task_id",
    [
        "evaluate_challenger",
        "select_model",
        "promote_challenger",
        "check_sources",
        "check_features",
        "check_scores",
    ],
)
def test_gates_do_not_retry(dagbag, task_id: str) -> None:
    assert dagbag.dags["churn_nightly"].get_task(task_id).retries == 0


def test_publish_emits_the_predictions_asset(dagbag) -> None:
    outlets = dagbag.dags["churn_nightly"].get_task("publish_scores").outlets
    assert [o.name for o in outlets] == ["churn_scores"]


def test_dag_files_import_no_heavy_libraries_at_top_level() -> None:
    for path in DAGS.glob("*.py"):
        head = [
            line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))
        ]
        for lib in ("pandas", "sklearn", "numpy", "pyarrow", "psycopg2"):
            assert not any(lib in line for line in head), (
                f"{path.name} imports {lib} at module level"
            )


def test_parsing_the_use_cases_imports_no_heavy_library() -> None:
    """What the factory imports to read the use cases stays light (a fresh interpreter)."""
    import subprocess
    import sys

    probe = (
        "import sys; from pipeline.conf import usecase; usecase.load_all(); "
        "print(','.join(m for m in ('pandas', 'sklearn', 'numpy', 'pyarrow', 'psycopg2') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_campaign_is_scheduled_on_the_published_scores_asset(dagbag) -> None:
    campaign_dag = dagbag.dags["churn_campaign"]
    publish = dagbag.dags["churn_nightly"].get_task("publish_scores")
    assets = list(campaign_dag.timetable.asset_condition.objects)
    assert [a.name for a in assets] == ["churn_scores"]
    assert [a.uri for a in publish.outlets] == [a.uri for a in assets]
    assert campaign_dag.params["dry_run"] is True  # nobody is emailed unless asked


def test_scoring_maps_one_task_per_partition_in_the_use_case_pool(
    dagbag, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    default = dagbag.dags["churn_nightly"].get_task("score_partition")
    assert default.pool == "default_pool"
    assert default.op_kwargs_expand_input.value["partition"] == [0, 1]
    shutil.copytree(DAGS.parent / "usecases" / "churn", tmp_path / "churn")
    config = tmp_path / "churn" / "usecase.yaml"
    config.write_text(
        config.read_text().replace("partitions: 2\n", "partitions: 6\n  pool: scoring\n")
    )
    monkeypatch.setenv("NIGHTSCORE_USECASES", str(tmp_path))
    scoring = DagBag(dag_folder=str(DAGS)).dags["churn_nightly"].get_task("score_partition")
    assert scoring.pool == "scoring"
    assert scoring.op_kwargs_expand_input.value["partition"] == list(range(6))
    assert dagbag.dags["churn_nightly"].get_task("publish_scores").pool == "default_pool"


def test_monitoring_trains_a_policy_only_where_a_campaign_is_and_asks_before_promoting(
    dagbag,
) -> None:
    churn = dagbag.dags["churn_monitoring"]
    ids = {t.task_id for t in churn.tasks}
    assert {
        "evaluate_realized_performance",
        "evaluate_campaign_uplift",
        "train_policy",
        "route_policy",
        "approve_policy",
        "promote_policy",
        "record_policy_review",
        "policy_decided",
    } == ids
    assert churn.get_task("train_policy").upstream_task_ids == {"evaluate_campaign_uplift"}
    assert churn.get_task("route_policy").downstream_task_ids == {
        "approve_policy",
        "policy_decided",
    }
    assert churn.get_task("promote_policy").upstream_task_ids >= {"approve_policy"}
    # recorded after a rejection too, which skips promote_policy
    review = churn.get_task("record_policy_review")
    assert review.upstream_task_ids == {"promote_policy", "train_policy"}
    assert review.trigger_rule == "none_failed_min_one_success"
    assert churn.get_task("train_policy").retries == 0  # a gate: the same data says the same
    other = dagbag.dags["late_payment_monitoring"]
    assert not {t.task_id for t in other.tasks} & {"train_policy", "approve_policy"}


def test_a_nightly_dag_alerts_when_it_fails_and_when_it_misses_its_configured_deadline(
    dagbag,
) -> None:
    import json
    from datetime import timedelta

    from airflow.serialization.serialized_objects import DagSerialization

    from pipeline.conf import usecase

    for uc in usecase.load_all():
        nightly = dagbag.dags[f"{uc.name}_nightly"]
        assert nightly.on_failure_callback is not None
        if uc.schedule.deadline is None:
            assert not nightly.deadline
            continue
        (alert,) = nightly.deadline
        assert alert.interval == uc.schedule.deadline_after
        serialized = json.dumps(DagSerialization.to_dict(nightly)["dag"]["deadline"])
        assert "DagRunQueuedAtDeadline" in serialized
        assert '"path": "_nightscore.alert_late"' in serialized
        assert f'"use_case": "{uc.name}"' in serialized
    assert usecase.load("churn").schedule.deadline_after == timedelta(hours=6)
