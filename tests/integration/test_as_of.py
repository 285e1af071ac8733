"""A night of date D uses only what existed as of D: the drift reference is the model in
force on D, a past night files no retrain request against a model since replaced, and its
report shows only outcomes matured by D (real PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import nightly
from pipeline.stages import train
from pipeline.store import db, registry
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")


def test_a_past_night_judges_drift_against_the_model_of_its_date(isolated: Settings) -> None:
    first_night = SCORE_DATE - timedelta(days=7)
    first = nightly.run_night(isolated, UC, first_night, retrain="always", run_id="asof-first")
    a = first["model_version"]
    # a later model, in force from SCORE_DATE
    b = train.train_challenger(isolated, UC.evolve({"model": {"seed": 7}}), SCORE_DATE)
    registry.promote(
        isolated, "churn", b.version, actor="test", reason="later", effective_date=SCORE_DATE
    )
    assert b.version != a and registry.champion(isolated, "churn").version == b.version
    before = registry.open_retrain_requests(isolated, "churn")

    past = SCORE_DATE - timedelta(days=3)
    nightly.run_night(isolated, UC, past, retrain="never", run_id="asof-past")
    stages = db.scalar(
        isolated.database_url, "SELECT stages FROM ml.runs WHERE run_id = 'asof-past'"
    )
    checked = stages["check_features"]
    assert checked["drift_reference"] == a
    drifted = [w for w in checked["warned"] if w["check"] in ("feature_psi", "unseen_categories")]
    assert drifted, "the test warehouse drifts (a launch in a new country)"
    # the drift concerns a model that is no longer served: nothing to retrain tonight
    assert registry.open_retrain_requests(isolated, "churn") == before

    # a night of today's champion files its request, naming that champion
    nightly.run_night(
        isolated, UC, SCORE_DATE + timedelta(days=1), retrain="never", run_id="asof-now"
    )
    requests = registry.open_retrain_requests(isolated, "churn")
    assert len(requests) == len(before) + 1 and requests[-1].startswith(
        f"features drifted from {b.version}'s training data"
    )


def test_a_nights_report_reads_only_outcomes_matured_by_its_date(isolated: Settings) -> None:
    champion = registry.champion(isolated, "churn").version
    conn = db.connect(isolated.database_url)
    try:
        with conn.cursor() as cur:
            for day, auc in ((SCORE_DATE - timedelta(days=60), 0.7123), (SCORE_DATE, 0.6543)):
                cur.execute(
                    "INSERT INTO monitoring.realized_performance (use_case, score_date, "
                    "model_version, rows, positives, roc_auc, lift_top_decile, brier, ece, "
                    "decile_rates, holdout_auc) VALUES ('churn', %s, %s, 100, 5, %s, 2, 0.05, "
                    "0.01, '{}', 0.75) ON CONFLICT DO NOTHING",
                    (day, champion, auc),
                )
        conn.commit()
    finally:
        conn.close()
    from pipeline.campaigns import monitor

    night = SCORE_DATE - timedelta(days=2)
    shown = monitor.matured_performance(isolated, UC, night)
    # matured 30 days after its date, long before the night; the other is scored after it
    assert [r["roc_auc"] for r in shown] == [0.7123]
    assert len(monitor.matured_performance(isolated, UC, SCORE_DATE + timedelta(days=30))) == 2
