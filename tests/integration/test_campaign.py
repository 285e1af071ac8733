"""Retention campaign: control group, audience, exports and sends against a real SMTP sink."""

from __future__ import annotations

import csv
import html
import logging
import time
from datetime import timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.campaigns import campaign
from pipeline.campaigns.audience import build_audience
from pipeline.campaigns.sending import SmtpTarget, send_campaign
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.conf.urls import with_role
from pipeline.core.keys import control_group
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE
from tests.smtp_sink import smtp_sink

UC = usecase.load("churn")
LATER = SCORE_DATE + timedelta(days=40)  # a monitoring date


def test_control_group_is_salted_stable_and_about_the_configured_fraction() -> None:
    keys = np.arange(1, 200_001, dtype=np.int64)
    fraction = UC.campaign.control_fraction
    members = control_group(keys, UC.campaign.control_salt, fraction)
    assert abs(members.mean() - fraction) < 0.004
    # membership depends on the key alone, not on which other keys are scored with it
    shuffled = np.random.default_rng(1).permutation(keys)[:5000]
    again = control_group(shuffled, UC.campaign.control_salt, UC.campaign.control_fraction)
    assert np.array_equal(again, members[shuffled - 1])
    other_salt = control_group(keys, "another-salt", fraction)
    assert abs(other_salt.mean() - fraction) < 0.004
    # a new salt, a new group: overlapping only by chance (fraction of the members)
    assert (members & other_salt).sum() < members.sum() * (fraction + 0.02)
    # raising the fraction keeps every member and adds some
    raised = control_group(keys, UC.campaign.control_salt, fraction + 0.1)
    assert raised[members].all() and raised.sum() > members.sum()


@pytest.fixture(scope="module")
def night(isolated: Settings) -> dict:
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="campaign-night")
    return {"model_version": out["model_version"], "rows": out["published"]["rows"]}


def audience_rows(settings: Settings, day=SCORE_DATE) -> list[dict]:
    return db.scalar(
        settings.database_url,
        "SELECT coalesce(json_agg(a ORDER BY audience_rank), '[]') FROM campaigns.retention_audience a "
        "WHERE score_date = %s",
        (day,),
    )


@pytest.fixture(scope="module")
def audience(isolated: Settings, night: dict) -> dict:
    return build_audience(isolated, UC, SCORE_DATE)


def test_audience_is_the_top_band_opted_in_outside_control_with_reasons(
    isolated: Settings, audience: dict
) -> None:
    rows = audience_rows(isolated)
    assert 0 < len(rows) == audience["audience"] <= UC.campaign.capacity
    ids = [r["customer_id"] for r in rows]
    served = db.scalar(
        isolated.database_url,
        "SELECT json_object_agg(customer_id, json_build_array(risk_decile, control_group, "
        "churn_probability)) FROM predictions.churn_scores WHERE score_date = %s "
        "AND customer_id = ANY(%s)",
        (SCORE_DATE, ids),
    )
    opted_in = db.scalar(
        isolated.warehouse_url,
        "SELECT json_object_agg(customer_id, marketing_opt_in) FROM warehouse.customers "
        "WHERE customer_id = ANY(%s)",
        (ids,),
    )
    for r in rows:
        decile, control, probability = served[str(r["customer_id"])]
        assert (
            decile <= UC.campaign.audience_deciles
            and not control
            and opted_in[str(r["customer_id"])]
        )
        assert r["churn_probability"] == probability
        assert 1 <= len(r["reasons"]) <= 3 and all(len(w) > 5 for w in r["reasons"])
        assert set(r["reason_features"]) <= set(UC.campaign.reasons)
    probabilities = [r["churn_probability"] for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    # reasons come from the model: not everyone gets the same three
    assert len({tuple(r["reason_features"]) for r in rows}) > 3
    # everyone opted in in the band but left out is in the control group, and is held out
    control = db.scalar(
        isolated.database_url,
        "SELECT array_agg(customer_id) FROM campaigns.retention_control_band WHERE score_date = %s",
        (SCORE_DATE,),
    )
    assert control and not set(control) & set(ids)
    assert control_group(
        np.array(control), UC.campaign.control_salt, UC.campaign.control_fraction
    ).all()
    assert audience["control_band"] == len(control)


def test_the_audience_is_exported_as_csv_and_parquet(isolated: Settings, audience: dict) -> None:
    rows = audience_rows(isolated)
    with open(audience["exports"]["csv"], newline="") as fh:
        exported = list(csv.DictReader(fh))
    parquet = pq.read_table(audience["exports"]["parquet"])
    assert [int(r["customer_id"]) for r in exported] == [r["customer_id"] for r in rows]
    assert parquet.column("email").to_pylist() == [r["email"] for r in rows]
    assert exported[0]["reason_1"] == rows[0]["reasons"][0]


def test_opt_outs_and_suppression_are_honoured(isolated: Settings, audience: dict) -> None:
    rows = audience_rows(isolated)
    unsubscribed, contacted_lately, contacted_long_ago = (r["customer_id"] for r in rows[:3])
    db.scalar(
        isolated.database_url,
        "INSERT INTO campaigns.retention_opt_outs (customer_id) VALUES (%s); "
        "INSERT INTO campaigns.retention_send_log (campaign, customer_id, score_date, run_id, message_id, "
        "status) VALUES ('churn_retention_earlier', %s, %s, 'r', 'm1', 'sent'), "
        "('churn_retention_older', %s, %s, 'r', 'm2', 'sent'); SELECT 1",
        (
            unsubscribed,
            contacted_lately,
            SCORE_DATE - timedelta(days=5),
            contacted_long_ago,
            SCORE_DATE - timedelta(days=UC.campaign.suppression_days + 5),
        ),
    )
    try:
        rebuilt = build_audience(isolated, UC, SCORE_DATE)
        ids = {r["customer_id"] for r in audience_rows(isolated)}
        assert unsubscribed not in ids and contacted_lately not in ids
        assert contacted_long_ago in ids
        assert rebuilt["excluded"]["unsubscribed"] >= 1 and rebuilt["excluded"]["suppressed"] >= 1
    finally:
        db.scalar(
            isolated.database_url,
            "DELETE FROM campaigns.retention_opt_outs; DELETE FROM campaigns.retention_send_log "
            "WHERE campaign LIKE 'churn_retention_%%er'; SELECT 1",
        )
        build_audience(isolated, UC, SCORE_DATE)


def test_a_control_member_is_held_back_as_a_contacted_one_would_be(
    isolated: Settings, audience: dict
) -> None:
    """The suppression window applies to the control band too: one who stood in another
    campaign's control band within it would have been contacted then, and is left out."""
    band = "SELECT array_agg(customer_id) FROM campaigns.retention_control_band WHERE campaign = %s"
    name = campaign.campaign_name(UC, SCORE_DATE)
    lately, long_ago = db.scalar(isolated.database_url, band, (name,))[:2]
    db.scalar(
        isolated.database_url,
        "INSERT INTO campaigns.retention_control_band (score_date, campaign, customer_id, "
        "model_version, churn_probability, risk_decile) VALUES "
        "(%s, 'churn_retention_earlier', %s, 'm', 0.5, 1), "
        "(%s, 'churn_retention_older', %s, 'm', 0.5, 1); SELECT 1",
        (
            SCORE_DATE - timedelta(days=5),
            lately,
            SCORE_DATE - timedelta(days=UC.campaign.suppression_days + 5),
            long_ago,
        ),
    )
    try:
        rebuilt = build_audience(isolated, UC, SCORE_DATE)
        held = set(db.scalar(isolated.database_url, band, (name,)))
        assert lately not in held and long_ago in held
        assert rebuilt["control_band"] == audience["control_band"] - 1
    finally:
        db.scalar(
            isolated.database_url,
            "DELETE FROM campaigns.retention_control_band WHERE campaign LIKE "
            "'churn_retention_%%er'; SELECT 1",
        )
        build_audience(isolated, UC, SCORE_DATE)


def test_dry_run_renders_files_and_records_nothing(isolated: Settings, audience: dict) -> None:
    with smtp_sink() as sink:
        out = send_campaign(
            isolated, UC, SCORE_DATE, "dry", target=SmtpTarget("127.0.0.1", sink.port)
        )
    assert out["dry_run"] and out["rendered"] == audience["audience"] and not sink.received
    first = audience_rows(isolated)[0]
    text = (isolated.home / "outbox" / out["campaign"] / f"{first['customer_id']}.eml").read_text()
    assert first["first_name"] in text and first["reasons"][0] in text
    assert first["email"] in text
    assert (
        db.scalar(isolated.database_url, "SELECT count(*) FROM campaigns.retention_send_log") == 0
    )


def test_each_person_receives_exactly_one_message_and_a_rerun_sends_nothing(
    isolated: Settings, audience: dict, caplog: pytest.LogCaptureFixture
) -> None:
    rows = audience_rows(isolated)
    refused = rows[-1]["email"]  # a mailbox the server rejects: failed, never retried
    caplog.set_level(logging.DEBUG)
    with smtp_sink() as sink:
        sink.refuse.add(refused)
        target = SmtpTarget("127.0.0.1", sink.port)
        began = time.monotonic()
        first = send_campaign(
            isolated, UC, SCORE_DATE, "send-1", target=target, dry_run=False, rate_per_second=400
        )
        seconds = time.monotonic() - began
        again = send_campaign(isolated, UC, SCORE_DATE, "send-2", target=target, dry_run=False)
    expected = sorted(r["email"] for r in rows if r["email"] != refused)
    assert sorted(sink.recipients()) == expected  # exactly one message each
    assert first["sent"] == len(expected) and first["failed"] == 1
    assert again["sent"] == 0 and again["already_sent"] == len(expected)
    assert seconds >= (len(rows) - 1) / 400  # paced by the rate limit
    message = sink.received[0][1]
    assert message["X-Campaign"] == campaign.campaign_name(UC, SCORE_DATE)
    assert rows[0]["first_name"] in message["Subject"]
    assert rows[0]["reasons"][0] in message.get_payload()
    log = db.scalar(
        isolated.database_url,
        "SELECT json_object_agg(status, n) FROM (SELECT status, count(*) AS n "
        "FROM campaigns.retention_send_log GROUP BY status) s",
    )
    assert log == {"sent": len(expected), "failed": 1}
    # no email address in the logs, nor in what the task returns (its XCom)
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail."))
    assert "pipeline.campaigns.sending" in {r.name for r in caplog.records}
    assert "@" not in ours and "@" not in str(first) + str(again)


def test_only_the_campaign_role_reads_the_audience(isolated: Settings, audience: dict) -> None:
    reader = with_role(isolated.database_url, "nightscore_reader")
    with pytest.raises(Exception, match="permission denied"):
        db.scalar(reader, "SELECT count(*) FROM campaigns.retention_audience")
    campaign_role = with_role(isolated.database_url, "nightscore_campaign")
    assert db.scalar(campaign_role, "SELECT count(*) FROM campaigns.retention_audience") > 0
    with pytest.raises(Exception, match="permission denied"):
        db.scalar(campaign_role, "SELECT count(*) FROM predictions.churn_scores")
    with pytest.raises(Exception, match="permission denied"):
        db.scalar(campaign_role, "DELETE FROM campaigns.retention_send_log RETURNING 1")


def test_past_dates_are_never_emailed(isolated: Settings, audience: dict) -> None:
    newer = SCORE_DATE + timedelta(days=2)
    nightly.run_night(isolated, UC, newer, retrain="never", run_id="campaign-newer")
    with smtp_sink() as sink:
        out = send_campaign(
            isolated,
            UC,
            SCORE_DATE - timedelta(days=7),
            "late",
            target=SmtpTarget("127.0.0.1", sink.port),
            dry_run=False,
        )
    assert out["sent"] == 0 and "newest published" in out["skipped_reason"]
    assert not sink.received


def test_control_membership_is_identical_across_model_versions_and_a_backfill(
    isolated: Settings, night: dict
) -> None:
    backfill_day = SCORE_DATE - timedelta(days=7)
    nightly.run_night(isolated, UC, backfill_day, retrain="never", run_id="campaign-backfill")
    later = SCORE_DATE + timedelta(days=5)  # the training grid has moved on: another model
    retrained = nightly.run_night(isolated, UC, later, retrain="always", run_id="campaign-retrain")
    challenger = retrained["evaluation"]["version"]
    nightly.run_night(
        isolated, UC, later, retrain="never", rescore_model=challenger, run_id="campaign-rescore"
    )
    flags = db.scalar(
        isolated.database_url,
        "SELECT json_object_agg(score_date || ':' || customer_id, control_group) "
        "FROM predictions.churn_scores_history WHERE score_date IN (%s, %s, %s)",
        (backfill_day, SCORE_DATE, later),
    )
    versions = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT model_version) FROM predictions.churn_scores_history "
        "WHERE score_date IN (%s, %s)",
        (SCORE_DATE, later),
    )
    assert len(versions) == 2 and challenger in versions
    by_customer: dict[str, set[bool]] = {}
    for key, flag in flags.items():
        by_customer.setdefault(key.split(":")[1], set()).add(flag)
    assert all(len(f) == 1 for f in by_customer.values())  # one answer per customer
    keys = np.array([int(k) for k in by_customer])
    expected = control_group(keys, UC.campaign.control_salt, UC.campaign.control_fraction)
    assert [next(iter(by_customer[str(k)])) for k in keys] == expected.tolist()
    assert expected.sum() > 100


def test_a_campaign_runs_report_tab_opens_its_page(isolated: Settings, audience: dict) -> None:
    from fastapi.testclient import TestClient

    from pipeline.reports import report_app, report_site, run_pages

    run_id = "manual__campaign-page"
    run_pages.record(isolated, "churn_campaign", run_id, "churn", "campaign", [SCORE_DATE])
    assert (
        report_site.run_target(isolated, ["churn"], "churn_campaign", run_id, "nightly")
        == f"nightscore/churn/campaign/{SCORE_DATE}"
    )
    client = TestClient(report_app.create_app(lambda: isolated, lambda: [UC]))
    page = client.get(f"/runs/churn_campaign/{run_id}", follow_redirects=True)
    assert page.status_code == 200 and str(page.url).endswith(f"/churn/campaign/{SCORE_DATE}")
    text = page.text
    assert f"churn: campaign of {SCORE_DATE}" in text
    assert f"<td>{audience['audience']:,}</td>" in text
    assert f"<td>{audience['control_band']:,}</td>" in text
    for reason, n in audience["excluded"].items():  # who was left out of the band, by reason
        assert f"<td>{reason.replace('_', ' ')}</td><td>{n:,}</td>" in text
    sends = db.scalar(
        isolated.database_url,
        "SELECT coalesce(json_object_agg(status, n), '{}') FROM (SELECT status, count(*) AS n "
        "FROM campaigns.retention_send_log WHERE campaign = %s GROUP BY 1) s",
        (audience["campaign"],),
    )
    assert sends, "the send test ran first: this page shows its sends"
    for status, n in sends.items():
        assert f"<td>{status}</td><td>{n:,}</td>" in text
    errors = db.scalar(
        isolated.database_url,
        "SELECT array_agg(DISTINCT error) FROM campaigns.retention_send_log "
        "WHERE campaign = %s AND status = 'failed'",
        (audience["campaign"],),
    )
    for error in errors or []:
        assert html.escape(error) in text
    assert "Power:" in text and "Targeting:" in text

    # a monitoring run's page; a run that recorded nothing gets a page saying so, not JSON
    run_pages.record(isolated, "churn_monitoring", "scheduled__m", "churn", "monitoring", [LATER])
    monitoring = client.get("/runs/churn_monitoring/scheduled__m", follow_redirects=True)
    assert monitoring.status_code == 200 and f"churn: monitoring as of {LATER}" in monitoring.text
    assert "Realized performance" in monitoring.text and "Retrain requests" in monitoring.text
    missing = client.get("/runs/churn_campaign/manual__nothing-yet")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "has no report yet" in missing.text
    assert client.get(f"/churn/campaign/{SCORE_DATE - timedelta(days=400)}").status_code == 404
    assert client.get("/churn/campaign/not-a-date").status_code == 404
