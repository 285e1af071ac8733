"""Realized performance once labels mature, and decay turning into a retrain request."""

from __future__ import annotations

from datetime import timedelta

from pipeline.campaigns import monitor
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import nightly
from pipeline.store import db, registry
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
MATURED = SCORE_DATE - timedelta(days=40)


def test_matured_nights_are_evaluated_once_against_actual_cancellations(isolated: Settings) -> None:
    out = nightly.run_night(isolated, UC, MATURED, retrain="always", run_id="monitor-night")
    assert monitor.matured_unevaluated(isolated, UC, MATURED + timedelta(days=29)) == []
    result = monitor.update_realized_performance(isolated, UC, SCORE_DATE)
    assert result["evaluated"] == [f"{MATURED}:{out['model_version']}"]
    row = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(p) FROM monitoring.realized_performance p WHERE score_date = %s",
        (MATURED,),
    )
    actual = db.scalar(
        isolated.warehouse_url,
        """SELECT count(*) FROM warehouse.cancellations x JOIN warehouse.customers c USING (customer_id)
           WHERE x.cancel_date >= %s AND x.cancel_date < %s AND c.signup_date < %s""",
        (MATURED, MATURED + timedelta(days=30), MATURED),
    )
    assert row["positives"] == actual > 0 and row["rows"] == out["published"]["rows"]
    assert 0.6 < row["roc_auc"] <= 1 and row["lift_top_decile"] > 1.5
    assert row["decile_rates"]["1"] > row["decile_rates"]["10"]
    # already evaluated: nothing new the next day
    assert (
        monitor.update_realized_performance(isolated, UC, SCORE_DATE + timedelta(days=1))[
            "evaluated"
        ]
        == []
    )


def test_decay_beyond_the_threshold_requests_a_retrain_the_next_night_honours(
    isolated: Settings,
) -> None:
    db.scalar(isolated.database_url, "DELETE FROM monitoring.realized_performance; SELECT 1")
    strict = UC.evolve(
        {"monitoring": {"decay_threshold": -1.0}}
    )  # any realized AUC counts as decayed
    assert monitor.update_realized_performance(isolated, strict, SCORE_DATE)["decayed"] >= 1
    assert registry.open_retrain_requests(isolated, "churn")
    run = nightly.RunContext("churn", SCORE_DATE, "monitor-retrain")
    nightly.start_run(isolated, UC, run)
    # the champion is young (cadence says no), but the request says yes
    decision = nightly.decide_retrain(
        isolated, UC.evolve({"training": {"retrain_every_days": 1000}}), run, "scheduled"
    )
    assert decision["retrain"] and "retrain requested" in decision["why"]
    assert registry.open_retrain_requests(isolated, "churn") == []


def test_the_nightly_report_shows_scores_drift_checks_and_realized_performance(
    isolated: Settings, monkeypatch, capsys
) -> None:
    from pipeline.faces import cli

    monkeypatch.setenv("NIGHTSCORE_DATABASE_URL", isolated.database_url)
    monkeypatch.setenv("NIGHTSCORE_HOME", str(isolated.home))
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="never", run_id="monitor-report")
    with open(out["report"]) as fh:
        text = fh.read()
    assert text.count("data:image/png;base64,") == 4
    assert "no_future_rows" in text and "daily_volume" in text and "population_size" in text
    assert "Realized ROC AUC" in text
    # the run header, its banner, links and context
    assert "banner-ok" in text and "Published</strong>" in text
    assert "<code>monitor-report</code>, attempt 2" in text  # after monitor-retrain
    assert "no: retrain=never" in text and "code version" in text and "snapshot sha256" in text
    assert f'href="{MATURED}">previous night: {MATURED}' in text
    assert "Score PSI vs the previous published night:" in text
    assert "Scores by segment" in text and "<td>country</td>" in text
    assert "Shadow agreement" in text
    assert cli.main(["report", "--use-case", "churn", "--date", SCORE_DATE.isoformat()]) == 0
    assert capsys.readouterr().out.strip() == out["report"]
