"""Registry, gates, promotion, rollback, shadow scoring, one model per run (real PostgreSQL)."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import psycopg2
import pytest

from pipeline.conf import config, usecase
from pipeline.conf.config import Settings
from pipeline.faces import cli
from pipeline.run import challenger, night_report, nightly
from pipeline.stages import train
from pipeline.store import db, registry
from pipeline.store.ledger import RunContext
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
    decision = challenger.evaluate_challenger(
        isolated, LENIENT, run("weak"), weak.as_xcom(), "auto"
    )
    assert decision["decision"] == "promote", decision["reasons"]
    return weak.version


def test_a_better_challenger_is_promoted_with_its_evidence(
    isolated: Settings, weak_champion: str
) -> None:
    r = run("better")
    nightly.start_run(isolated, UC, r)
    trained = nightly.train_challenger(isolated, UC, r)
    out = challenger.evaluate_challenger(isolated, LENIENT, r, trained, "auto")
    assert out["decision"] == "promote", out["reasons"]
    assert registry.champion(isolated, "churn").version == trained["version"]
    ev = evaluation_row(isolated, trained["version"])
    assert ev["champion"] == weak_champion
    # every metric for both models, and the paired evidence with its intervals
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
    assert ci["se"] > 0 and 0 < ci["low"] <= ci["estimate"] <= ci["high"]
    assert ev["intervals"]["log_loss_gain"]["confidence"] > UC.gates.promote_confidence
    assert {c["check"] for c in ev["checks"]} >= {
        "auc_floor",
        "better_than_champion",
        "auc_not_worse",
        "score_shift_vs_champion",
    }
    assert [h["as_of"] for h in ev["holdout_dates"]] == [str(SCORE_DATE - timedelta(days=30))]
    assert ev["holdout_dates"][0]["positives"] > 0
    report = ev["report_path"]
    assert report.endswith(".html")
    with open(report) as fh:
        text = fh.read()
    assert text.count("data:image/png;base64,") == 3
    # the gates, the model card, what the model leans on, and how it does per market
    assert "<h2>Gates</h2>" in text and "better_than_champion" in text
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
    out = challenger.evaluate_challenger(isolated, UC, r, noise.as_xcom(), "auto")
    assert out["decision"] == "reject"
    ev = evaluation_row(isolated, noise.version)
    assert ev["decision"] == "reject"
    assert any("auc_floor" in reason for reason in ev["reasons"])
    assert any("better_than_champion" in reason for reason in ev["reasons"])
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
        outs.append(challenger.evaluate_challenger(isolated, UC, run(tag, day), first, "never"))
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


def test_the_champions_own_bytes_are_not_a_new_model_nor_a_first_one(isolated: Settings) -> None:
    day = SCORE_DATE - timedelta(days=5)
    previous = registry.champion(isolated, "churn").version
    first = nightly.train_challenger(isolated, UC, run("identical-1", day))
    registry.promote(
        isolated, "churn", first["version"], actor="test", reason="t", effective_date=day
    )
    before = {v.version for v in registry.list_versions(isolated, "churn")}
    r = run("identical", day)
    nightly.start_run(isolated, UC, r)
    trained = nightly.train_challenger(isolated, UC, r)
    # the same data and seed: the same bytes, under the name they were registered with
    assert trained["sha256"] == first["sha256"] and trained["version"] == first["version"]
    assert trained["registered_before"]
    assert {v.version for v in registry.list_versions(isolated, "churn")} == before
    out = challenger.evaluate_challenger(isolated, UC, r, trained, "approval")
    assert out["decision"] == "identical"
    assert f"identical to {first['version']}, the champion" in out["reasons"][0]
    assert "first model" not in out["summary"] and "Identical to" in out["summary"]
    assert registry.champion(isolated, "churn").version == first["version"]
    assert evaluation_row(isolated, first["version"])["decision"] == "identical"
    registry.promote(
        isolated, "churn", previous, actor="test", reason="restore", effective_date=day
    )


def test_a_rejection_is_recorded_with_who_and_when(isolated: Settings) -> None:
    r = run("review", SCORE_DATE - timedelta(days=2))
    nightly.start_run(isolated, UC, r)
    trained = nightly.train_challenger(isolated, LENIENT, r)
    out = challenger.evaluate_challenger(isolated, LENIENT, r, trained, "approval")
    assert out["decision"] in ("awaiting_approval", "identical"), out["reasons"]
    if out["decision"] == "identical":
        pytest.skip("the training window gave the champion's bytes")
    answer = {
        "chosen_options": ["Reject"],
        "responded_by_user": {"id": "admin", "name": "admin"},
        "responded_at": "2026-12-06T09:04:00+00:00",
    }
    recorded = challenger.record_review(isolated, UC, r, out, answer)
    assert recorded["note"] == (
        f"Rejected by admin at 2026-12-06 09:04 UTC; {out['version']} kept as shadow; "
        f"{out['champion']} stays champion"
    )
    ev = evaluation_row(isolated, out["version"])
    assert ev["decision"] == "rejected" and ev["reviewed_by"] == "admin"
    assert ev["reviewed_at"].startswith("2026-12-06T09:04")
    # a second answer finds nothing awaiting approval: the first one stands
    again = registry.Review.from_hitl(answer | {"chosen_options": ["Approve"]})
    assert (
        registry.record_review(isolated, "ml.evaluations", "churn", out["version"], r.run_id, again)
        == 0
    )
    # the night's report says so
    report = night_report.write_report(isolated, UC, r)["report"]
    with open(report) as fh:
        assert "Rejected by admin at 2026-12-06 09:04" in fh.read()


def test_approving_a_past_dated_run_never_puts_the_log_and_the_registry_at_odds(
    isolated: Settings,
) -> None:
    versions = [v.version for v in registry.list_versions(isolated, "churn")]
    current = registry.champion(isolated, "churn").version
    newest = registry.champion_since(isolated, "churn")
    other = next(v for v in versions if v != current)
    past = newest - timedelta(days=20)
    # an approval answered today for a run of 20 days before the newest promotion
    registry.promote(
        isolated, "churn", other, actor="approval:admin", reason="late", effective_date=past
    )
    assert registry.champion(isolated, "churn").version == other
    assert registry.champion_since(isolated, "churn") == newest
    for day in (newest, newest + timedelta(days=1), newest + timedelta(days=30)):
        assert registry.champion_on(isolated, "churn", day) == other
    registry.promote(
        isolated, "churn", current, actor="test", reason="restore", effective_date=newest
    )


def test_a_decayed_champion_is_known_as_of_the_night(isolated: Settings) -> None:
    champion = registry.champion(isolated, "churn")
    holdout_auc = champion.metrics["roc_auc"]
    day = SCORE_DATE + timedelta(days=40)
    ledger_exec = db.connect(isolated.database_url)
    try:
        with ledger_exec.cursor() as cur:
            cur.execute(
                "INSERT INTO monitoring.realized_performance (use_case, score_date, model_version, "
                "rows, positives, roc_auc, lift_top_decile, brier, ece, decile_rates, holdout_auc) "
                "VALUES ('churn', %s, %s, 1000, 50, %s, 2.0, 0.05, 0.01, '{}', %s)",
                (day, champion.version, holdout_auc - 0.08, holdout_auc),
            )
        ledger_exec.commit()
    finally:
        ledger_exec.close()
    from pipeline.campaigns import monitor

    horizon = UC.label.horizon_days
    # labels of that night mature 30 days later: a night before then does not know it yet
    assert (
        monitor.champion_decay(isolated, UC, champion.version, day + timedelta(days=horizon - 1))
        is None
    )
    why = monitor.champion_decay(isolated, UC, champion.version, day + timedelta(days=horizon))
    assert why and "monitoring.decay_threshold" in why and f"{holdout_auc - 0.08:.4f}" in why


def test_pooled_holdout_dates_are_judged_together_counting_each_customer_once(
    isolated: Settings,
) -> None:
    pooled = UC.evolve({"training": {"holdout_snapshots": 3}})
    r = run("pooled", SCORE_DATE - timedelta(days=3))
    nightly.start_run(isolated, pooled, r)
    trained = nightly.train_challenger(isolated, pooled, r)
    assert len(trained["holdouts"]) == 3
    out = challenger.evaluate_challenger(isolated, pooled, r, trained, "never")
    ev = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(e) FROM ml.evaluations e WHERE run_id = %s",
        (r.run_id,),
    )
    assert [h["as_of"] for h in ev["holdout_dates"]] == [h["as_of"] for h in trained["holdouts"]]
    compared = [h for h in ev["holdout_dates"] if h["compared"]]
    assert compared, "the champion is out of time on at least the newest date"
    gain = ev["intervals"]["log_loss_gain"]
    assert gain["rows"] == sum(h["rows"] for h in compared)
    if len(compared) > 1:  # the same customers on several dates count once each
        assert gain["entities"] < gain["rows"]
        assert f"over {len(compared)} holdout dates" in str(ev["checks"][0]["found"])
    assert "Holdout: " in out["summary"]
