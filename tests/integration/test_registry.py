"""Registry, gates, promotion, rollback, shadow scoring, one model per run (real PostgreSQL)."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import psycopg2
import pytest

from pipeline import cli, config, db, nightly, registry, train, usecase
from pipeline.config import Settings
from pipeline.ledger import RunContext
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")
WEAK_FEATURES = [
    "country",
    "contract_type",
    "tenure_days",
    "late_payments_180d",
    "overdue_invoices",
    "tickets_30d",
    "tickets_90d",
    "complaints_90d",
    "fee_change_90d",
]
# The weak champion (no usage features) clears this policy's floors, not the default ones, and
# a far better model spreads its scores well beyond the weak one's (large score PSI).
LENIENT = UC.evolve({"gates": {"auc_floor": 0.6, "lift_floor": 1.5, "score_psi_limit": 1.0}})


def evaluation_row(settings: Settings, version: str) -> dict:
    return db.scalar(
        settings.database_url,
        "SELECT row_to_json(e) FROM ml.evaluations e WHERE challenger = %s ORDER BY evaluation_id DESC LIMIT 1",
        (version,),
    )


@pytest.fixture(autouse=True)
def cli_points_at_isolated(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTSCORE_DATABASE_URL", isolated.database_url)
    monkeypatch.setenv("NIGHTSCORE_HOME", str(isolated.home))


def run(tag: str, day=SCORE_DATE) -> RunContext:
    return RunContext("churn", day, f"test-{tag}")


@pytest.fixture(scope="module")
def weak_champion(isolated: Settings) -> str:
    """A champion that lacks the behavioural features (usage, billing, tickets)."""
    data = train.training_data(isolated, UC, SCORE_DATE)
    model = train.fit(UC, data.table, WEAK_FEATURES, data.labels)
    weak = train.save_and_register(isolated, UC, SCORE_DATE, model, WEAK_FEATURES, data)
    nightly.start_run(isolated, UC, run("weak"))
    decision = nightly.evaluate_challenger(isolated, LENIENT, run("weak"), weak.as_xcom(), "auto")
    assert decision["decision"] == "promote", decision["reasons"]
    return weak.version


def test_a_better_challenger_is_promoted_with_its_evidence(
    isolated: Settings, weak_champion: str
) -> None:
    r = run("better")
    nightly.start_run(isolated, UC, r)
    trained = nightly.train_challenger(isolated, UC, r)
    out = nightly.evaluate_challenger(isolated, LENIENT, r, trained, "auto")
    assert out["decision"] == "promote", out["reasons"]
    assert registry.champion(isolated, "churn").version == trained["version"]
    ev = evaluation_row(isolated, trained["version"])
    assert ev["champion"] == weak_champion
    # every metric for both models, and paired intervals from at least 1000 resamples
    for who in ("challenger", "champion"):
        assert {
            "roc_auc",
            "pr_auc",
            "brier",
            "log_loss",
            "ece",
            "lift_top_decile",
            "precision_top_decile",
            "precision_at_capacity",
            "lift_at_capacity",
        } <= set(ev["metrics"][who])
    ci = ev["intervals"]["roc_auc_diff"]
    assert ci["resamples"] >= 1000 and 0 < ci["low"] <= ci["estimate"] <= ci["high"]
    assert "lift_top_decile_diff" in ev["intervals"]
    assert {c["check"] for c in ev["checks"]} >= {
        "auc_floor",
        "auc_noninferiority",
        "score_psi_vs_champion",
    }
    report = ev["report_path"]
    assert report.endswith(".html")
    with open(report) as fh:
        text = fh.read()
    assert text.count("data:image/png;base64,") == 3
    # the gates, the model card, what the model leans on, and how it does per market
    assert "<h2>Gates</h2>" in text and "auc_noninferiority" in text
    assert "<h2>Model card</h2>" in text and "training rows" in text and "max_iter" in text
    assert "Feature importance (challenger)" in text and "<code>tenure_days</code>" in text
    assert "Metrics by segment (holdout)" in text and "<h3>country</h3>" in text
    promo = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(p) FROM ml.promotions p WHERE version = %s",
        (trained["version"],),
    )
    assert promo["previous_version"] == weak_champion and promo["run_id"] == r.run_id


def test_a_challenger_trained_on_shuffled_labels_is_rejected(
    isolated: Settings, weak_champion: str
) -> None:
    champion_before = registry.champion(isolated, "churn").version
    data = train.training_data(isolated, UC, SCORE_DATE)
    cat, num = train.split_columns(data.table.schema, UC)
    shuffled = np.random.default_rng(0).permutation(data.labels)
    model = train.fit(UC, data.table, cat + num, shuffled)
    noise = train.save_and_register(isolated, UC, SCORE_DATE, model, cat + num, data)
    r = run("shuffled")
    nightly.start_run(isolated, UC, r)
    out = nightly.evaluate_challenger(isolated, UC, r, noise.as_xcom(), "auto")
    assert out["decision"] == "reject"
    ev = evaluation_row(isolated, noise.version)
    assert ev["decision"] == "reject"
    assert any("auc_floor" in reason for reason in ev["reasons"])
    assert any("auc_noninferiority" in reason for reason in ev["reasons"])
    assert registry.champion(isolated, "churn").version == champion_before
    assert registry.get(isolated, "churn", noise.version).status == "shadow"


def test_same_data_and_seed_give_identical_metrics_and_decision(isolated: Settings) -> None:
    day = SCORE_DATE - timedelta(days=1)  # a model nobody promoted yet
    first = nightly.train_challenger(isolated, UC, run("det-1", day))
    second = nightly.train_challenger(isolated, UC, run("det-2", day))
    assert first["version"] == second["version"] and first["sha256"] == second["sha256"]
    outs = []
    for tag in ("det-a", "det-b"):
        nightly.start_run(isolated, UC, run(tag, day))
        outs.append(nightly.evaluate_challenger(isolated, UC, run(tag, day), first, "never"))
    assert outs[0]["decision"] == outs[1]["decision"]
    rows = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_array(metrics, intervals, checks, decision) ORDER BY evaluation_id) "
        "FROM ml.evaluations WHERE run_id IN ('test-det-a', 'test-det-b')",
    )
    assert len(rows) == 2 and rows[0] == rows[1]


def test_one_model_per_run_even_if_someone_promotes_meanwhile(isolated: Settings) -> None:
    r = run("pinned", SCORE_DATE + timedelta(days=1))
    started = nightly.start_run(isolated, UC, r)
    at_start = started["champion_at_start"]
    other = next(
        v.version for v in registry.list_versions(isolated, "churn") if v.version != at_start
    )
    registry.promote(
        isolated,
        "churn",
        other,
        actor="test",
        reason="promoted mid-run",
        effective_date=r.score_date,
    )
    try:
        chosen = nightly.select_model(isolated, UC, r, None, at_start)
        assert chosen["model_version"] == at_start
    finally:
        registry.rollback(
            isolated, "churn", actor="test", reason="undo", effective_date=r.score_date
        )
    assert registry.champion(isolated, "churn").version == at_start


def test_rollback_restores_the_previous_champion_and_the_next_publish_uses_it(
    isolated: Settings,
) -> None:
    current = registry.champion(isolated, "churn").version
    previous = db.scalar(
        isolated.database_url,
        "SELECT previous_version FROM ml.promotions WHERE use_case = 'churn' ORDER BY promotion_id DESC LIMIT 1",
    )
    assert previous and previous != current
    days = {config.today_in("UTC")}  # the rollback may run either side of midnight
    assert (
        cli.main(["models", "--use-case", "churn", "rollback", "--reason", "bad campaign results"])
        == 0
    )
    days.add(config.today_in("UTC"))
    assert registry.champion(isolated, "churn").version == previous
    stamped = db.scalar(
        isolated.database_url,
        "SELECT effective_date FROM ml.promotions ORDER BY promotion_id DESC LIMIT 1",
    )
    assert stamped in {registry.next_night(isolated, "churn", d) for d in days}
    day = SCORE_DATE + timedelta(days=2)
    out = nightly.run_night(isolated, UC, day, retrain="never", run_id="test-after-rollback")
    assert out["model_version"] == previous
    served = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores WHERE score_date = %s",
        (day,),
    )
    assert served == [previous]
    log = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(p) FROM ml.promotions p ORDER BY promotion_id DESC LIMIT 1",
    )
    assert (
        log["action"] == "rollback"
        and log["reason"] == "bad campaign results"
        and log["actor"].startswith("cli:")
    )
    # the champion on any past date is answered from the log
    assert registry.champion_on(isolated, "churn", SCORE_DATE - timedelta(days=365)) is None


def test_a_promotion_by_hand_is_stamped_with_the_first_night_it_serves(
    isolated: Settings,
) -> None:
    newest = db.scalar(
        isolated.database_url, "SELECT max(score_date) FROM ml.runs WHERE use_case = 'churn'"
    )
    assert newest is not None
    # the night after the newest scored night, however far behind the clock the data is
    assert registry.next_night(
        isolated, "churn", newest - timedelta(days=30)
    ) == newest + timedelta(days=1)
    # and never before today
    later = newest + timedelta(days=5)
    assert registry.next_night(isolated, "churn", later) == later
    assert registry.next_night(isolated, "no_runs_yet", date(2030, 1, 2)) == date(2030, 1, 2)


def test_the_promotions_log_is_append_only(isolated: Settings) -> None:
    conn = db.connect(isolated.database_url)
    try:
        with (
            pytest.raises(psycopg2.errors.RaiseException, match="append-only"),
            conn.cursor() as cur,
        ):
            cur.execute("UPDATE ml.promotions SET reason = 'rewritten'")
        conn.rollback()
        with (
            pytest.raises(psycopg2.errors.RaiseException, match="append-only"),
            conn.cursor() as cur,
        ):
            cur.execute("DELETE FROM ml.promotions")
    finally:
        conn.close()


def test_a_shadow_model_is_scored_beside_the_champion_never_served(isolated: Settings) -> None:
    shadow = registry.shadow(isolated, "churn")
    assert shadow is not None
    day = SCORE_DATE + timedelta(days=3)
    out = nightly.run_night(isolated, UC, day, retrain="never", run_id="test-shadow-night")
    assert out["shadow"]["shadow"] == shadow.version
    served_versions = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores WHERE score_date = %s",
        (day,),
    )
    assert shadow.version not in served_versions
    shadow_rows = db.scalar(
        isolated.database_url,
        "SELECT count(*) FROM predictions.churn_scores_shadow WHERE score_date = %s AND model_version = %s",
        (day, shadow.version),
    )
    assert shadow_rows == out["published"]["rows"]
    agree = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(a) FROM monitoring.shadow_agreement a WHERE score_date = %s",
        (day,),
    )
    assert agree["champion"] == out["model_version"] and agree["shadow"] == shadow.version
    assert -1 <= agree["spearman"] <= 1 and 0 <= agree["top_decile_overlap"] <= 1
    assert agree["audience_enter"] == agree["audience_leave"]


def test_cli_lists_and_shows_models(isolated: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--use-case", "churn", "list"]) == 0
    listing = capsys.readouterr().out
    champ = registry.champion(isolated, "churn").version
    assert champ in listing and "champion" in listing
    assert cli.main(["models", "--use-case", "churn", "show", champ]) == 0
    assert '"sha256"' in capsys.readouterr().out
    assert cli.main(["models", "--use-case", "churn", "show", "churn-19990101-deadbeef"]) == 2
    assert "not in ml.model_versions" in capsys.readouterr().err
