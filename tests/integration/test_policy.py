"""Targeting by uplift, end to end: weekly campaigns sent to a simulated world that responds,
their matured outcomes, an uplift policy trained and checked out of time, the registry, and
an audience ranked by the policy in force."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta

import numpy as np
import pytest

from pipeline.campaigns import campaign, experiment, monitor, policy, policy_learning, selection
from pipeline.campaigns.audience import build_audience
from pipeline.campaigns.sending import SmtpTarget, send_campaign
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import ModelError
from pipeline.run import nightly
from pipeline.store import db, serving
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World
from tests.conftest import _SESSION_HOME, WAREHOUSE_START, create_database, drop_database
from tests.smtp_sink import smtp_sink

BASE = usecase.load("churn")
assert BASE.campaign is not None
UC = BASE.model_copy(
    update={
        "campaign": BASE.campaign.model_copy(
            update={
                "capacity": 500,
                "audience_deciles": 3,
                "control_fraction": 0.3,
                "policy": BASE.campaign.policy.model_copy(
                    update={
                        "rank_by": "uplift",
                        "promotion_mode": "auto",
                        "min_training_weeks": 3,
                        "holdout_weeks": 1,
                        "min_holdout_control_positives": 5,
                        "bootstrap_resamples": 200,
                    }
                ),
            }
        )
    }
)
FIRST = date(2024, 10, 28)  # a Monday, 301 days into the world
NIGHTS = [FIRST + timedelta(weeks=w) for w in range(4)]
MATURED = NIGHTS[-1] + timedelta(days=UC.label.horizon_days)


@pytest.fixture(scope="module")
def world(server_url: str, session_id: str) -> Iterator[Settings]:
    """Four weekly campaigns, really sent, in a world that responds; all matured."""
    name = f"nightscore_test_{session_id}_policy"
    url = create_database(server_url, name)
    serving.init(url, usecase.load_all())
    s = Settings(database_url=url, warehouse_url=url, home=_SESSION_HOME / name)
    warehouse.seed(s, World(8000, WAREHOUSE_START, seed=11), (FIRST - WAREHOUSE_START).days)
    try:
        with smtp_sink() as sink:
            target = SmtpTarget("127.0.0.1", sink.port)
            for i, night in enumerate(NIGHTS):
                if i:
                    warehouse.advance(s, night - timedelta(days=1))
                retrain = "always" if i == 0 else "never"
                nightly.run_night(s, UC, night, retrain=retrain, run_id=f"policy-{night}")
                built = build_audience(s, UC, night)
                assert built["policy"] == policy.RISK  # no policy yet
                send_campaign(
                    s,
                    UC,
                    night,
                    f"send-{night}",
                    target=target,
                    dry_run=False,
                    rate_per_second=5000,
                )
        warehouse.advance(s, MATURED)
        monitor.update_campaign_uplift(s, UC, MATURED)
        yield s
    finally:
        drop_database(server_url, name)


def test_the_experiment_pools_the_weekly_cohorts(world: Settings) -> None:
    pooled = monitor.campaign_experiment(world, UC)
    assert pooled is not None and pooled["weeks"] == len(NIGHTS)
    sent = db.scalar(
        world.database_url,
        "SELECT count(*) FROM campaigns.retention_send_log WHERE status = 'sent'",
    )
    # each customer counts once, at their first selection; later ones are counted apart
    first = db.scalar(
        world.database_url,
        "SELECT count(DISTINCT customer_id) FROM campaigns.retention_send_log "
        "WHERE status = 'sent'",
    )
    repeats = db.scalar(
        world.database_url, "SELECT sum(repeat_contacted) FROM monitoring.campaign_uplift"
    )
    assert pooled["contacted"] == first and repeats == sent - first > 0
    assert pooled["ci_low"] < pooled["uplift"] < pooled["ci_high"]
    assert [c["week"] for c in pooled["cohorts"]] == [
        experiment.week_of(n).isoformat() for n in NIGHTS
    ]


def test_too_few_weeks_train_no_policy(world: Settings) -> None:
    strict = UC.model_copy(
        update={
            "campaign": UC.campaign.model_copy(
                update={"policy": UC.campaign.policy.model_copy(update={"min_training_weeks": 4})}
            )
        }
    )
    out = policy_learning.train_challenger(world, strict, MATURED)
    assert (
        out["decision"] is None and "4 weekly cohorts have matured; a policy needs 5" in out["why"]
    )
    risk = UC.model_copy(
        update={
            "campaign": UC.campaign.model_copy(
                update={"policy": UC.campaign.policy.model_copy(update={"rank_by": "risk"})}
            )
        }
    )
    assert policy_learning.train_challenger(world, risk, MATURED)["decision"] is None


def test_in_approval_mode_a_policy_waits_for_a_person(world: Settings) -> None:
    asking = UC.model_copy(
        update={
            "campaign": UC.campaign.model_copy(
                update={
                    "policy": UC.campaign.policy.model_copy(update={"promotion_mode": "approval"})
                }
            )
        }
    )
    out = policy_learning.train_challenger(world, asking, MATURED, run_id="approval-run")
    try:
        passed = all(c["passed"] for c in out["checks"])
        assert out["decision"] == ("awaiting_approval" if passed else "reject")
        assert policy.champion(world, asking) is None  # nothing in force until someone says so
        assert "ranked by risk until an uplift policy is promoted" in policy.policy_text(
            world, asking
        )
        assert out["summary"].startswith("Qini ")
    finally:  # so that the auto-mode tests below train their own
        db.scalar(
            world.database_url,
            "DELETE FROM ml.policies WHERE run_id = 'approval-run'; SELECT 1",
        )


@pytest.fixture(scope="module")
def trained(world: Settings) -> dict:
    return policy_learning.train_challenger(world, UC, MATURED, run_id="policy-run")


def test_a_policy_is_trained_out_of_time_and_registered_with_its_evidence(
    world: Settings, trained: dict
) -> None:
    ev = trained["evidence"]
    assert ev["incumbent"] == policy.RISK
    assert ev["holdout_weeks"] == [experiment.week_of(NIGHTS[-1]).isoformat()]
    assert ev["training_weeks"] == [experiment.week_of(n).isoformat() for n in NIGHTS[:-1]]
    q = ev["qini"]
    for part in ("challenger", "champion", "difference"):
        assert q[part]["low"] <= q[part]["estimate"] <= q[part]["high"]
    # held out: the newest cohort's contacted and control band, nothing else
    newest = db.scalar(
        world.database_url,
        "SELECT json_build_object('contacted', contacted, 'control', control) "
        "FROM monitoring.campaign_uplift WHERE score_date = %s",
        (NIGHTS[-1],),
    )
    assert ev["holdout"]["contacted"] == newest["contacted"]
    assert ev["holdout"]["control"] == newest["control"]
    passed = all(c["passed"] for c in trained["checks"])
    assert trained["decision"] == ("promote" if passed else "reject")
    row = policy.get(world, UC, trained["version"])
    assert row["decision"] == trained["decision"] and row["run_id"] == "policy-run"
    assert row["trained_through"] == experiment.week_of(NIGHTS[-1]).isoformat()
    assert row["status"] == ("champion" if passed else "candidate")
    # nothing newer has matured: a second run trains nothing
    again = policy_learning.train_challenger(world, UC, MATURED)
    assert again["decision"] is None and "no cohort newer" in again["why"]


def test_the_policy_in_force_ranks_the_audience_and_its_control_band(
    world: Settings, trained: dict
) -> None:
    if policy.champion(world, UC) is None:  # the gates said no: a person may still decide
        policy.promote(
            world, UC, trained["version"], actor="test", reason="ranking test", run_id=None
        )
    night = NIGHTS[-1]
    built = build_audience(world, UC, night)
    assert built["policy"] == trained["version"]
    rows = db.scalar(
        world.database_url,
        "SELECT json_agg(json_build_array(policy, rank_score) ORDER BY audience_rank) "
        "FROM campaigns.retention_audience WHERE score_date = %s",
        (night,),
    )
    scores = [r[1] for r in rows]
    assert {r[0] for r in rows} == {trained["version"]}
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    control = db.scalar(
        world.database_url,
        "SELECT array_agg(rank_score) FROM campaigns.retention_control_band WHERE score_date = %s",
        (night,),
    )
    cutoff = scores[-1] if len(scores) == UC.campaign.capacity else 0
    assert control and all(c >= cutoff for c in control)
    # the same night ranked by risk chooses others
    risk = selection.select(world, UC, night, rank_by=policy.RISK)
    risky = set(risk.audience.column("customer_id").to_pylist())
    assert risk.policy == policy.RISK
    assert len(risky - {r for r in _audience_keys(world, night)}) > 0
    assert "ranked by expected uplift" in policy.policy_text(world, UC)
    promotions = db.scalar(
        world.database_url,
        "SELECT count(*) FROM ml.policy_promotions WHERE version = %s",
        (trained["version"],),
    )
    assert promotions == 1


def test_a_tampered_policy_artifact_is_refused(world: Settings, trained: dict) -> None:
    row = policy.get(world, UC, trained["version"])
    path = row["artifact_uri"]
    with open(path, "rb") as fh:
        original = fh.read()
    try:
        with open(path, "ab") as fh:
            fh.write(b"x")
        with pytest.raises(ModelError, match="sha256"):
            policy.load(world, UC, trained["version"])
    finally:
        with open(path, "wb") as fh:
            fh.write(original)
    model, _ = policy.load(world, UC, trained["version"])
    band = selection.select(world, UC, NIGHTS[-1], rank_by=policy.RISK).band
    frame = selection.features_for(
        world,
        UC,
        NIGHTS[-1],
        campaign.published_run(world, UC, NIGHTS[-1]),
        band.column("customer_id").to_numpy(),
    )
    expected = model.predict_uplift(frame, band.column("churn_probability").to_numpy())
    assert np.isfinite(expected).all() and np.abs(expected).max() < 1


def _audience_keys(settings: Settings, night: date) -> list[int]:
    return db.scalar(
        settings.database_url,
        "SELECT array_agg(customer_id) FROM campaigns.retention_audience WHERE score_date = %s",
        (night,),
    )
