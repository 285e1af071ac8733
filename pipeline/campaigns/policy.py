"""Audience policies: whom a campaign contacts, by risk or by expected uplift.

Ranking by risk emails the entities most likely to have the outcome, whether or not an
email changes anything for them. Every campaign is also a randomized experiment (the control
band is held out by a hash of the key), so once its outcomes mature the contacted and the
control band of the same nights show whom an email *changes*. From them an uplift model
(``campaign.policy.learner``: a log-odds effect on top of the served risk, or a T-learner;
``pipeline.campaigns.uplift``) is trained and becomes a policy *challenger*:

1. **Data.** Every measured campaign (``monitoring.campaign_uplift``): its contacted
   (send log, sent) and control band, their features from the night's published
   snapshot, the outcome over the label window, the served probability.
2. **Out of time.** The newest ``holdout_weeks`` weekly cohorts are held out; the model
   learns from the earlier ones (at least ``min_training_weeks``).
3. **Evidence.** On the held-out cohorts, the challenger's ranking and the policy in force
   (the served probability for risk, or the champion policy's uplift) are compared by
   Qini coefficient and AUUC, with a paired bootstrap interval of the Qini difference.
4. **Gates.** Enough held-out control outcomes; the challenger's Qini above the policy in
   force, its lower bound above ``-qini_margin``. Then ``promotion_mode``: ``auto``
   promotes, ``approval`` waits for a person (the monitoring DAG's ``approve_policy``),
   ``never`` records it. Versions, evidence, checks and promotions are in ``ml.policies``
   and ``ml.policy_promotions``.

With ``rank_by: uplift`` the policy in force ranks the audience (``audience.build_audience``);
until one is promoted, risk does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.campaigns import uplift
from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ModelError
from pipeline.store import db

log = logging.getLogger(__name__)

RISK = "risk"
Model = uplift.EffectModel | uplift.TwoModel


def campaign_groups(settings: Settings, uc: UseCase, campaign: str) -> pa.Table:
    """The campaign's experiment: its sent entities (``contacted``) and its control band,
    with their served probability, and whether the campaign selected them for the first
    time (``first``: no earlier campaign of the use case sent them an email or put them in
    its control band).

    Only first selections compare like with like. An earlier email changed who is still
    there to select: it kept some customers it could persuade, who stay at risk and are
    selected again, while their counterparts in the control group left. Among repeat
    selections the contacted hold more customers an email keeps than the control band
    does, and the difference of their outcome rates understates the emails' effect.
    """
    assert uc.campaign is not None
    c = uc.campaign
    key, p = db.quote_ident(uc.entity_key), db.quote_ident(uc.probability_column)
    send_log, band = (
        db.quote_ident("campaigns", c.send_log_table),
        db.quote_ident("campaigns", c.control_table),
    )
    return db.read_arrow(
        settings.database_url,
        f"WITH g AS (SELECT s.{key}, true AS contacted, a.{p} AS probability, s.score_date "
        f"FROM {send_log} s LEFT JOIN {db.quote_ident('campaigns', c.audience_table)} a "
        f"ON a.campaign = s.campaign AND a.{key} = s.{key} "
        "WHERE s.campaign = :campaign AND s.status = 'sent' "
        f"UNION ALL SELECT {key}, false, {p}, score_date FROM {band} "
        "WHERE campaign = :campaign) "
        f"SELECT g.{key}, g.contacted, g.probability, "
        f"NOT EXISTS (SELECT 1 FROM {send_log} e WHERE e.{key} = g.{key} "
        "AND e.score_date < g.score_date AND e.status IN ('sending', 'sent')) "
        f"AND NOT EXISTS (SELECT 1 FROM {band} b WHERE b.{key} = g.{key} "
        "AND b.score_date < g.score_date) AS first FROM g",
        {"campaign": campaign},
    )


# -- the registry of policies ---------------------------------------------------------------


def _row(
    settings: Settings, uc: UseCase, rest: str, params: tuple[Any, ...] = ()
) -> dict[str, Any] | None:
    """One ``ml.policies`` row of ``uc`` (as a dict): the first ``rest`` leaves."""
    return db.scalar(
        settings.database_url,
        f"SELECT row_to_json(p) FROM ml.policies p WHERE use_case = %s {rest}",
        (uc.name, *params),
    )


def champion(settings: Settings, uc: UseCase) -> dict[str, Any] | None:
    """The uplift policy in force (its ``ml.policies`` row), or None: ranking by risk."""
    return _row(settings, uc, "AND status = 'champion'")


def get(settings: Settings, uc: UseCase, version: str) -> dict[str, Any]:
    row = _row(settings, uc, "AND version = %s", (version,))
    if row is None:
        raise ModelError(
            f"no policy {version!r} of use case {uc.name!r} in ml.policies; "
            "`nightscore monitor` trains policies once campaigns mature"
        )
    return dict(row)


def load(settings: Settings, uc: UseCase, version: str) -> tuple[Model, dict[str, Any]]:
    """A registered policy's model, after checking its artifact against the registry."""
    from pipeline.store import registry

    row = get(settings, uc, version)
    raw = registry.verified(
        Path(row["artifact_uri"]),
        row["sha256"],
        f"artifact of {uc.name} policy {version}",
        "restore the original, or let the next matured campaign train another policy",
        "restore the artifact store, or let the next matured campaign train another policy",
    )
    return registry.unpickle(raw), row


def promote(
    settings: Settings, uc: UseCase, version: str, *, actor: str, reason: str, run_id: str | None
) -> str | None:
    """Put ``version`` in force (the previous one retires); logged. Returns the previous."""
    from pipeline.store import registry

    def promotion(previous: str | None) -> tuple[str, tuple[Any, ...]]:
        return (
            "INSERT INTO ml.policy_promotions (use_case, version, previous_version, actor, "
            "reason, run_id) VALUES (%s, %s, %s, %s, %s, %s)",
            (uc.name, version, previous, actor, reason, run_id),
        )

    previous = registry.swap_champion(
        settings, "ml.policies", uc.name, version, promotion, what="policy"
    )
    log.info("%s: policy %s in force (was %s): %s", uc.name, version, previous or RISK, reason)
    return previous


def record_review(
    settings: Settings,
    uc: UseCase,
    trained: dict[str, Any],
    answer: dict[str, Any],
    run_id: str | None,
) -> dict[str, Any]:
    """Record a person's answer to the approval of the policy ``train_challenger`` returned:
    decision, who and when into ``ml.policies``, and one sentence for the run's note."""
    from pipeline.store import registry

    review = registry.Review.from_hitl(answer)
    registry.record_review(settings, "ml.policies", uc.name, trained["version"], run_id, review)
    note = review.text(
        f"policy {trained['version']}",
        "put in force" if review.approved else "not put in force; the policy in force stays",
    )
    log.log(logging.INFO if review.approved else logging.WARNING, "%s", note)
    return {"decision": review.decision, "by": review.by, "note": note}


# -- training, evidence and gates -------------------------------------------------------------


# -- ranking an audience ----------------------------------------------------------------------


def in_force(settings: Settings, uc: UseCase) -> dict[str, Any] | None:
    """The uplift policy that ranks ``uc``'s audience, or None: ranked by risk (the config
    says so, or no uplift policy has been promoted yet)."""
    if uc.campaign is None or uc.campaign.policy.rank_by == RISK:
        return None
    row = champion(settings, uc)
    if row is None:
        log.info("%s: no uplift policy in force yet; the audience is ranked by risk", uc.name)
    return row


def expected_uplift(
    settings: Settings, uc: UseCase, version: str, frame: pd.DataFrame, risk: np.ndarray
) -> np.ndarray:
    """Policy ``version``'s expected uplift (outcome prevented) for each row of ``frame``,
    whose served probabilities are ``risk``."""
    model, _ = load(settings, uc, version)
    return model.predict_uplift(frame, risk)


def newest_policy(settings: Settings, uc: UseCase) -> dict[str, Any] | None:
    """The registry row of ``uc``'s most recently trained policy, whatever its decision."""
    return _row(settings, uc, "ORDER BY created_at DESC LIMIT 1")


def policy_text(settings: Settings, uc: UseCase) -> str:
    """The policy in force and why, in one or two sentences (report, demo, CLI)."""
    if uc.campaign is None:
        return "no campaign"
    if uc.campaign.policy.rank_by == RISK:
        return "ranked by risk (campaign.policy.rank_by: risk)"
    row = champion(settings, uc)
    if row is None:
        newest = newest_policy(settings, uc)
        if newest is None:
            tail = "; no uplift policy has been trained yet (it needs matured weekly cohorts)"
        else:
            verdict = {
                "reject": "was rejected by the gates ("
                + "; ".join(failed_checks(newest["checks"]))
                + ")",
                "awaiting_approval": "passed the gates and awaits approval",
                "approved": "was approved, then retired",
                "rejected": "passed the gates and was rejected by "
                + str(newest.get("reviewed_by") or "nobody (the approval timed out)"),
                "shadow": "passed the gates; promotion_mode never keeps it out",
                "promote": "was promoted, then retired",
            }[newest["decision"]]
            tail = f"; the newest challenger, {newest['version']}, {verdict}"
        return "ranked by risk until an uplift policy is promoted" + tail
    promoted = db.scalar(
        settings.database_url,
        "SELECT json_build_object('actor', actor, 'reason', reason, 'at', at) "
        "FROM ml.policy_promotions WHERE use_case = %s AND version = %s ORDER BY at DESC LIMIT 1",
        (uc.name, row["version"]),
    )
    return (
        f"ranked by expected uplift: policy {row['version']} (trained on "
        f"{', '.join(row['evidence']['training_weeks'])}), put in force by "
        f"{promoted['actor']}: {promoted['reason']}"
    )


def failed_checks(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check that did not pass (the policy's gates)."""
    return [
        f"{c['name']}: expected {c['expected']}, found {c['found']}"
        for c in checks
        if not c["passed"]
    ]
