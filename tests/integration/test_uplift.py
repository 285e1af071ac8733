"""Campaign uplift: churn of the emailed vs the control band, once the labels have matured."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import date, timedelta

import pytest

from pipeline.campaigns import monitor
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import night_report
from pipeline.store import db
from pipeline.store.ledger import RunContext

UC = usecase.load("churn")
D = date(2024, 10, 1)  # labels [D, D+30) matured by 2024-10-31, inside the warehouse
AS_OF = date(2024, 11, 20)
CAMPAIGN = "churn_retention_20241001"
UNMATURED = date(2024, 11, 15)  # matures on 2024-12-15
UNSENT = date(2024, 9, 15)
Z95 = 1.959964


def _active_on(settings: Settings, day: date) -> list[int]:
    """Customers signed up before ``day`` and not cancelled before it, by id."""
    conn = db.connect(settings.warehouse_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT c.customer_id FROM warehouse.customers c
                   WHERE c.signup_date < %s AND NOT EXISTS (
                       SELECT 1 FROM warehouse.cancellations x
                       WHERE x.customer_id = c.customer_id AND x.cancel_date < %s)
                   ORDER BY c.customer_id""",
                (day, day),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def _churned(settings: Settings, ids: Sequence[int], day: date) -> int:
    """How many of ``ids`` cancelled in [day, day + 30): the churn label, counted in SQL."""
    return db.scalar(
        settings.warehouse_url,
        """SELECT count(DISTINCT customer_id) FROM warehouse.cancellations
           WHERE customer_id = ANY(%s) AND cancel_date >= %s AND cancel_date < %s""",
        (list(ids), day, day + timedelta(days=UC.label.horizon_days)),
    )


def _add_campaign(
    settings: Settings,
    campaign: str,
    day: date,
    control: Sequence[int],
    sends: Sequence[tuple[int, str]],
) -> None:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO campaigns.retention_control_band (score_date, campaign, customer_id, "
                "model_version, churn_probability, risk_decile) VALUES (%s, %s, %s, 'v1', 0.4, 1)",
                [(day, campaign, c) for c in control],
            )
            cur.executemany(
                "INSERT INTO campaigns.retention_send_log (campaign, customer_id, score_date, run_id, "
                "message_id, status) VALUES (%s, %s, %s, 'test-run', %s, %s)",
                [(campaign, c, day, f"<{campaign}.{c}@test>", status) for c, status in sends],
            )
        conn.commit()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def groups(isolated: Settings) -> dict[str, list[int]]:
    """Three campaigns: one matured and sent, one not matured yet, one never sent."""
    active = _active_on(isolated, D)
    assert len(active) > 600
    contacted, control, unconfirmed = active[:300], active[300:500], active[500:540]
    sends = [(c, "sent") for c in contacted] + [
        (c, "failed" if i % 2 else "sending") for i, c in enumerate(unconfirmed)
    ]
    _add_campaign(isolated, CAMPAIGN, D, control, sends)
    later = _active_on(isolated, UNMATURED)
    _add_campaign(
        isolated,
        f"churn_retention_{UNMATURED:%Y%m%d}",
        UNMATURED,
        later[:50],
        [(later[60], "sent")],
    )
    earlier = _active_on(isolated, UNSENT)
    band = earlier[:50] + [c for c in control[:20] if c in set(earlier)]
    _add_campaign(
        isolated,
        f"churn_retention_{UNSENT:%Y%m%d}",
        UNSENT,
        band,
        [(earlier[60], "failed"), (earlier[61], "sending")],
    )
    # selected by that earlier campaign: its control band, and a message perhaps sent
    # ('sending'); a 'failed' one reached no one
    before = {*band, earlier[61]}
    assert before & set(contacted) and before & set(control)
    return {
        "contacted": [c for c in contacted if c not in before],
        "control": [c for c in control if c not in before],
        "repeat_contacted": [c for c in contacted if c in before],
        "repeat_control": [c for c in control if c in before],
    }


def test_a_matured_campaign_is_measured_once_against_actual_cancellations(
    isolated: Settings, groups: dict[str, list[int]]
) -> None:
    result = monitor.update_campaign_uplift(isolated, UC, AS_OF)

    assert [r["campaign"] for r in result] == [CAMPAIGN]
    row = db.scalar(
        isolated.database_url,
        "SELECT row_to_json(u) FROM monitoring.campaign_uplift u WHERE use_case = 'churn'",
    )
    assert row["campaign"] == CAMPAIGN and row["score_date"] == D.isoformat()
    # 'failed' and 'sending' (unconfirmed) messages are not counted as contacted; those
    # an earlier campaign selected are counted apart, in neither group
    n1, n0 = len(groups["contacted"]), len(groups["control"])
    assert (row["contacted"], row["control"]) == (n1, n0)
    assert row["repeat_contacted"] == len(groups["repeat_contacted"]) > 0
    assert row["repeat_control"] == len(groups["repeat_control"]) > 0
    assert n1 + row["repeat_contacted"] == 300 and n0 + row["repeat_control"] == 200
    k1 = _churned(isolated, groups["contacted"], D)
    k0 = _churned(isolated, groups["control"], D)
    assert k1 > 0 and k0 > 0
    assert row["contacted_positives"] == k1 and row["control_positives"] == k0
    p1, p0 = k1 / n1, k0 / n0
    assert row["contacted_rate"] == pytest.approx(p1) and row["control_rate"] == pytest.approx(p0)
    assert row["uplift"] == pytest.approx(p0 - p1)
    assert row["ci_low"] < row["uplift"] < row["ci_high"]
    half = Z95 * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * half, rel=1e-5)
    assert row["uplift"] - row["ci_low"] == pytest.approx(half, rel=1e-5)
    # the return value is the stored row, JSON-ready
    stored = {k: v for k, v in row.items() if k not in ("use_case", "evaluated_at")}
    assert json.loads(json.dumps(result[0])) == pytest.approx(stored)

    # measured once: a rerun, or the next day, adds nothing and rewrites nothing
    assert monitor.update_campaign_uplift(isolated, UC, AS_OF) == []
    assert monitor.update_campaign_uplift(isolated, UC, AS_OF + timedelta(days=1)) == []
    assert db.scalar(isolated.database_url, "SELECT count(*) FROM monitoring.campaign_uplift") == 1
    assert (
        db.scalar(isolated.database_url, "SELECT row_to_json(u) FROM monitoring.campaign_uplift u")
        == row
    )
    # a row measured before first selections were told apart is measured again
    db.scalar(
        isolated.database_url,
        "UPDATE monitoring.campaign_uplift SET contacted = 300, control = 200, "
        "repeat_contacted = NULL, repeat_control = NULL; SELECT 1",
    )
    again = monitor.update_campaign_uplift(isolated, UC, AS_OF)
    assert [(r["campaign"], r["contacted"], r["control"]) for r in again] == [(CAMPAIGN, n1, n0)]


def test_campaigns_wait_for_their_labels_and_for_a_sent_message(
    isolated: Settings, groups: dict[str, list[int]]
) -> None:
    unmatured = f"churn_retention_{UNMATURED:%Y%m%d}"
    matures = UNMATURED + timedelta(days=UC.label.horizon_days)
    assert unmatured not in dict(monitor.matured_campaigns(isolated, UC, AS_OF))
    assert unmatured not in dict(monitor.matured_campaigns(isolated, UC, matures - timedelta(1)))
    assert dict(monitor.matured_campaigns(isolated, UC, matures))[unmatured] == UNMATURED
    # nothing was ever sent: no campaign to measure, however late
    unsent = f"churn_retention_{UNSENT:%Y%m%d}"
    assert unsent not in dict(monitor.matured_campaigns(isolated, UC, date(2026, 1, 1)))


def test_nightscore_monitor_prints_the_campaign_uplift(
    isolated: Settings, groups: dict[str, list[int]], monkeypatch, capsys
) -> None:
    from pipeline.faces import cli

    db.scalar(isolated.database_url, "DELETE FROM monitoring.campaign_uplift; SELECT 1")
    monkeypatch.setenv("NIGHTSCORE_DATABASE_URL", isolated.database_url)
    monkeypatch.setenv("NIGHTSCORE_HOME", str(isolated.home))
    assert cli.main(["monitor", "--use-case", "churn", "--date", AS_OF.isoformat()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["evaluated"] == []  # no published night in this database
    [measured] = out["campaign_uplift"]
    assert measured["campaign"] == CAMPAIGN and measured["score_date"] == D.isoformat()
    assert measured["contacted"] == len(groups["contacted"])
    assert measured["control"] == len(groups["control"])
    # one matured week: no uplift policy yet, and the audience stays ranked by risk
    assert out["policy_challenger"]["decision"] is None
    assert out["policy_challenger"]["why"].startswith("1 weekly cohort has matured")
    assert out["policy_in_force"].startswith("ranked by risk until an uplift policy")


def test_the_nightly_report_shows_matured_campaigns(
    isolated: Settings, groups: dict[str, list[int]]
) -> None:
    monitor.update_campaign_uplift(isolated, UC, AS_OF)
    row = db.scalar(
        isolated.database_url, "SELECT row_to_json(u) FROM monitoring.campaign_uplift u"
    )
    out = night_report.write_report(isolated, UC, RunContext("churn", AS_OF, "uplift-report"))
    with open(out["report"]) as fh:
        text = fh.read()
    assert CAMPAIGN in text and f"{row['contacted']} ({row['contacted_positives']})" in text
    assert f"{100 * row['uplift']:+.1f} [{100 * row['ci_low']:+.1f}," in text
    # a night before the campaign's labels matured does not show it
    out = night_report.write_report(isolated, UC, RunContext("churn", D, "uplift-report-early"))
    with open(out["report"]) as fh:
        text = fh.read()
    assert CAMPAIGN not in text and "no campaign has matured yet" in text


def test_a_campaign_with_two_score_dates_fails_loudly(
    isolated: Settings, groups: dict[str, list[int]]
) -> None:
    from pipeline.core.errors import DataError

    ids = _active_on(isolated, UNSENT)
    _add_campaign(isolated, "churn_retention_mixed", UNSENT, ids[100:101], [(ids[102], "sent")])
    _add_campaign(isolated, "churn_retention_mixed", D, [], [(ids[103], "sent")])
    try:
        with pytest.raises(DataError, match="churn_retention_mixed"):
            monitor.update_campaign_uplift(isolated, UC, AS_OF)
    finally:
        for table in ("retention_control_band", "retention_send_log"):
            db.scalar(
                isolated.database_url,
                f"DELETE FROM campaigns.{table} WHERE campaign = 'churn_retention_mixed'; SELECT 1",
            )
