"""The whole night in-process on real PostgreSQL: train, gate, score, publish; re-runs replace."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import ConfigError, ModelError
from pipeline.run import nightly
from pipeline.store import db, registry, serving
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")


def served(settings: Settings, score_date) -> tuple[int, int, str]:
    """(rows, distinct customers, content hash) of the served rows for a date."""
    conn = db.connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute(
            """SELECT count(*), count(DISTINCT customer_id),
                      md5(string_agg(customer_id || ':' || churn_probability || ':' || risk_decile || ':' || model_version,
                                     ',' ORDER BY customer_id))
               FROM predictions.churn_scores WHERE score_date = %s""",
            (score_date,),
        )
        row = cur.fetchone()
    conn.close()
    return row


@pytest.fixture(scope="module")
def first_night(isolated: Settings) -> dict:
    return nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="test-night-1")


def test_first_night_trains_promotes_and_publishes_everyone(
    isolated: Settings, first_night: dict
) -> None:
    version = first_night["model_version"]
    assert first_night["evaluation"]["decision"] == "promote"
    champ = registry.champion(isolated, "churn")
    assert champ is not None and champ.version == version
    # the model learned real signal out of time
    assert champ.metrics["roc_auc"] > 0.7
    assert champ.metrics["lift_top_decile"] > 2.5
    rows, distinct, _ = served(isolated, SCORE_DATE)
    population = first_night["published"]["rows"]
    assert rows == distinct == population > 3000
    # the latest view serves exactly one date: the newest published one (never an older backfill)
    newest = db.scalar(
        isolated.database_url,
        "SELECT max(score_date) FROM ml.runs WHERE use_case = 'churn' AND status = 'published'",
    )
    assert newest >= SCORE_DATE
    served_dates = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT score_date) FROM predictions.churn_scores_latest",
    )
    assert served_dates == [newest]
    deciles = db.scalar(
        isolated.database_url,
        "SELECT array_agg(n ORDER BY d) FROM (SELECT risk_decile d, count(*) n FROM predictions.churn_scores "
        "WHERE score_date = %s GROUP BY 1) x",
        (SCORE_DATE,),
    )
    assert len(deciles) == 10 and max(deciles) - min(deciles) <= 1


def test_the_card_records_how_the_model_was_made(isolated: Settings, first_night: dict) -> None:
    mv = registry.get(isolated, "churn", first_night["model_version"])
    assert mv.training_window["holdout"]["as_of"] == str(SCORE_DATE - timedelta(days=30))
    assert len(mv.training_window["snapshots"]) == UC.training.snapshots
    assert {"scikit-learn", "numpy", "pandas", "python"} <= set(mv.library_versions)
    assert {f["name"] for f in mv.feature_schema} >= {"tenure_days", "usage_trend", "country"}
    run = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(r) FROM ml.runs r WHERE run_id = 'test-night-1'",
    )
    assert run["status"] == "published" and run["model_version"] == mv.version
    assert run["snapshot_sha256"] and run["code_version"]
    assert run["source_counts"]["invoices"]["rows"] > 0
    assert {"build_features", "train_challenger", "publish_scores"} <= set(run["stages"])


def test_the_run_records_which_predictor_served_each_partition(
    isolated: Settings, first_night: dict
) -> None:
    stages = db.scalar(
        isolated.database_url, "SELECT stages FROM ml.runs WHERE run_id = 'test-night-1'"
    )
    for p in range(UC.serving.partitions):
        stage = stages[f"score_partition_{p}"]
        # the fast predictor served, having agreed with scikit-learn to the bit on its sample
        assert stage["predictor"] == "forest" and stage["fallback"] is None
        assert stage["checked_rows"] > 0 and stage["max_abs_diff"] == 0
        assert stage["compile_seconds"] >= 0
    # the in-process night read the model and built its predictor once for every partition
    assert len({stages[f"score_partition_{p}"]["compile_seconds"] for p in range(2)}) == 1


def test_a_partition_scored_with_the_shared_model_is_the_one_scored_alone(
    isolated: Settings, first_night: dict, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from pipeline.stages import features, score

    sha256 = db.scalar(
        isolated.database_url, "SELECT snapshot_sha256 FROM ml.runs WHERE run_id = 'test-night-1'"
    )
    snapshot = features.find_snapshot(isolated, UC, SCORE_DATE, sha256)
    version = first_night["model_version"]
    shared = score.load(isolated, UC, version)
    alone = score.score_partition(isolated, UC, snapshot, version, 1, 2, "alone")
    together = score.score_partition(isolated, UC, snapshot, version, 1, 2, "shared", shared)
    assert alone.rows == together.rows > 0 and together.predictor.name == "forest"
    assert pq.read_table(alone.path).equals(pq.read_table(together.path))


def test_rerunning_a_date_replaces_its_rows_with_identical_ones(
    isolated: Settings, first_night: dict, caplog: pytest.LogCaptureFixture
) -> None:
    before = served(isolated, SCORE_DATE)
    caplog.set_level(logging.INFO, logger="pipeline.stages.windows")
    for i in range(2):
        nightly.run_night(isolated, UC, SCORE_DATE, retrain=False, run_id=f"test-rerun-{i}")
    assert served(isolated, SCORE_DATE) == before
    # the kept blocks check their days against what the night's source checks counted
    evidence = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept ")]
    assert len(evidence) == 2 * 3, evidence
    assert all(m.endswith("from the night's source checks") for m in evidence), evidence


def test_a_tampered_artifact_is_refused(isolated: Settings, first_night: dict) -> None:
    mv = registry.get(isolated, "churn", first_night["model_version"])
    path = Path(mv.artifact_uri)
    original = path.read_bytes()
    try:
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0x01
        path.write_bytes(bytes(tampered))
        with pytest.raises(ModelError, match="modified or replaced"):
            registry.load_model(isolated, "churn", mv.version)
        path.unlink()
        with pytest.raises(ModelError, match="missing"):
            registry.load_model(isolated, "churn", mv.version)
    finally:
        path.write_bytes(original)


def test_no_champion_and_no_retrain_stops_with_a_clear_error(
    isolated: Settings, first_night: dict
) -> None:
    other = UC.evolve({"name": "churn_empty", "serving": {"table": "churn_empty_scores"}})
    serving.init(isolated.database_url, [other])
    run = nightly.RunContext("churn_empty", SCORE_DATE, "test-no-champion")
    nightly.start_run(isolated, other, run)
    with pytest.raises(ModelError, match=r"no challenger has been trained yet.*retrain=always"):
        nightly.select_model(isolated, other, run)
    assert (
        db.scalar(
            isolated.database_url, "SELECT status FROM ml.runs WHERE run_id = 'test-no-champion'"
        )
        == "failed"
    )


def test_a_rejected_first_challenger_is_quoted_with_its_reasons_and_the_knobs(
    isolated: Settings, first_night: dict
) -> None:
    strict = UC.evolve(
        {"name": "churn_strict", "serving": {"table": "churn_strict_scores"},
         "gates": {"auc_floor": 0.99}}
    )  # fmt: skip
    serving.init(isolated.database_url, [strict])
    with pytest.raises(ModelError) as err:
        nightly.run_night(isolated, strict, SCORE_DATE, retrain="always", run_id="strict-1")
    message = str(err.value)
    assert "trained tonight was not promoted (decision reject)" in message
    assert "FAIL auc_floor: expected ROC AUC >= 0.99" in message
    assert (
        "gates.auc_floor 0.99" in message and "nightscore models promote churn_strict-" in message
    )


def test_a_run_refuses_before_any_work_when_its_serving_objects_are_missing(
    isolated: Settings,
) -> None:
    other = UC.evolve({"name": "churn_uninit", "serving": {"table": "churn_uninit_scores"}})
    run = nightly.RunContext("churn_uninit", SCORE_DATE, "test-uninit")
    with pytest.raises(
        ConfigError, match=r"no predictions\.churn_uninit_scores.*nightscore db init"
    ):
        nightly.start_run(isolated, other, run)
    assert (
        db.scalar(
            isolated.database_url, "SELECT count(*) FROM ml.runs WHERE run_id = 'test-uninit'"
        )
        == 0
    )
