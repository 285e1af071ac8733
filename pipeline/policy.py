"""Audience policies: whom a campaign contacts, by risk or by expected uplift.

Ranking by risk emails the entities most likely to have the outcome, whether or not an
email changes anything for them. Every campaign is also a randomized experiment (the control
band is held out by a hash of the key), so once its outcomes mature the contacted and the
control band of the same nights show whom an email *changes*. From them an uplift model
(``campaign.policy.learner``: a log-odds effect on top of the served risk, or a T-learner;
``pipeline.uplift``) is trained and becomes a policy *challenger*:

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

With ``rank_by: uplift`` the policy in force ranks the audience (``campaign.build_audience``);
until one is promoted, risk does.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import db, evaluate, experiment, keys, train, uplift
from pipeline.config import Settings, private_dir
from pipeline.errors import ModelError
from pipeline.usecase import UseCase

log = logging.getLogger(__name__)

RISK = "risk"
Model = uplift.EffectModel | uplift.TwoModel


@dataclass(frozen=True)
class Experiments:
    """The matured campaigns of a use case as one table of rows."""

    frame: pd.DataFrame  # features, plus the columns below
    columns: list[str]  # the feature columns
    treated: np.ndarray
    y: np.ndarray
    risk: np.ndarray  # the served probability
    week: np.ndarray  # the weekly cohort (a date) of each row

    def rows(self, mask: np.ndarray) -> Experiments:
        return Experiments(
            self.frame[mask].reset_index(drop=True),
            self.columns,
            self.treated[mask],
            self.y[mask],
            self.risk[mask],
            self.week[mask],
        )


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


def experiments(settings: Settings, uc: UseCase) -> Experiments | None:
    """Every measured campaign's first selections (``campaign_groups``; None when none has
    matured)."""
    from pipeline import campaign as campaigns
    from pipeline import monitor

    measured = db.read_arrow(
        settings.database_url,
        "SELECT campaign, score_date FROM monitoring.campaign_uplift WHERE use_case = :uc "
        "ORDER BY score_date, campaign",
        {"uc": uc.name},
    ).to_pylist()
    parts, columns = [], None
    for m in measured:
        day = db.to_date(m["score_date"])
        groups = campaign_groups(settings, uc, m["campaign"])
        groups = groups.filter(groups.column("first"))  # like with like: campaign_groups
        if not groups.num_rows:
            continue
        wanted = keys.to_numpy(groups.column(uc.entity_key))
        run = campaigns.published_run(settings, uc, day)
        frame = campaigns.features_for(settings, uc, day, run, wanted)
        columns = columns or list(frame.columns)
        frame["_treated"] = groups.column("contacted").to_numpy(zero_copy_only=False)
        frame["_y"] = monitor.matured_labels(settings, uc, day).of(wanted)
        frame["_risk"] = groups.column("probability").to_numpy(zero_copy_only=False)
        frame["_week"] = experiment.week_of(day)
        parts.append(frame)
    if not parts or columns is None:
        return None
    frame = pd.concat(parts, ignore_index=True)
    return Experiments(
        frame[columns],
        columns,
        frame["_treated"].to_numpy(dtype=bool),
        frame["_y"].to_numpy(dtype=np.int64),
        frame["_risk"].to_numpy(dtype=np.float64),
        frame["_week"].to_numpy(),
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
    from pipeline import registry

    row = get(settings, uc, version)
    raw = registry.verified(
        Path(row["artifact_uri"]),
        row["sha256"],
        f"artifact of {uc.name} policy {version}",
        "restore the original, or let the next matured campaign train another policy",
        "restore the artifact store, or let the next matured campaign train another policy",
    )
    return pickle.loads(raw), row


def promote(
    settings: Settings, uc: UseCase, version: str, *, actor: str, reason: str, run_id: str | None
) -> str | None:
    """Put ``version`` in force (the previous one retires); logged. Returns the previous."""
    from pipeline import registry

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
    from pipeline import registry

    review = registry.Review.from_hitl(answer)
    registry.record_review(settings, "ml.policies", uc.name, trained["version"], run_id, review)
    note = review.text(
        f"policy {trained['version']}",
        "put in force" if review.approved else "not put in force; the policy in force stays",
    )
    log.log(logging.INFO if review.approved else logging.WARNING, "%s", note)
    return {"decision": review.decision, "by": review.by, "note": note}


# -- training, evidence and gates -------------------------------------------------------------


def train_challenger(
    settings: Settings, uc: UseCase, as_of: date, run_id: str | None = None
) -> dict[str, Any]:
    """Train, evaluate out of time and gate an uplift policy from the matured campaigns.

    Returns ``{"decision": None, "why": ...}`` when there is nothing to do (``rank_by`` is
    risk, too few weeks, no campaign newer than the last policy's), else the registered
    version with its evidence, checks and decision (promoted now when ``auto``).
    """
    if uc.campaign is None or uc.campaign.policy.rank_by == RISK:
        return {"decision": None, "why": "the audience is ranked by risk (campaign.policy.rank_by)"}
    cfg = uc.campaign.policy
    needed = cfg.min_training_weeks + cfg.holdout_weeks
    # counted before anything is read: most nights there is nothing new to learn from
    measured = db.read_arrow(
        settings.database_url,
        "SELECT DISTINCT score_date FROM monitoring.campaign_uplift "
        "WHERE use_case = :uc AND contacted > 0 AND control > 0",
        {"uc": uc.name},
    ).column(0)
    weeks = sorted({experiment.week_of(db.to_date(d)) for d in measured.to_pylist()})
    if len(weeks) < needed:
        return {"decision": None, "why": _too_few(len(weeks), needed, cfg)}
    through = max(weeks)
    newest = db.scalar(
        settings.database_url,
        "SELECT max(trained_through) FROM ml.policies WHERE use_case = %s",
        (uc.name,),
    )
    if newest is not None and db.to_date(newest) >= through:
        return {"decision": None, "why": f"no cohort newer than the last policy's ({newest})"}
    data = experiments(settings, uc)
    weeks = sorted(set(data.week)) if data is not None else []
    if data is None or len(weeks) < needed:
        return {"decision": None, "why": _too_few(len(weeks), needed, cfg)}
    held = np.isin(data.week, np.array(weeks[-cfg.holdout_weeks :], dtype=object))
    learn, test = data.rows(~held), data.rows(held)
    model = fit(uc, learn)
    incumbent = champion(settings, uc)
    s_ch = model.predict_uplift(test.frame, test.risk)
    if incumbent is None:
        s_inc, inc_name = test.risk, RISK
    else:
        inc_model, _ = load(settings, uc, incumbent["version"])
        s_inc, inc_name = inc_model.predict_uplift(test.frame, test.risk), incumbent["version"]
    qini, auuc = (
        uplift.compare(
            s_ch,
            s_inc,
            test.treated,
            test.y,
            metric=metric,
            resamples=cfg.bootstrap_resamples,
            seed=uc.model.seed,
        )
        for metric in (uplift.qini_coefficient, uplift.auuc)
    )
    control_positives = int(test.y[~test.treated].sum())
    checks = [
        {
            "name": "holdout_control_positives",
            "passed": control_positives >= cfg.min_holdout_control_positives,
            "expected": f">= {cfg.min_holdout_control_positives}",
            "found": str(control_positives),
        },
        {
            "name": "qini_better",
            "passed": qini["difference"]["estimate"] > 0,
            "expected": f"Qini above {inc_name}'s",
            "found": f"{qini['difference']['estimate']:+.4f}",
        },
        {
            "name": "qini_noninferior",
            "passed": qini["difference"]["low"] >= -cfg.qini_margin,
            "expected": f"difference's lower bound >= {0 - cfg.qini_margin:+.4f}",
            "found": f"{qini['difference']['low']:+.4f}",
        },
    ]
    passed = all(c["passed"] for c in checks)
    decision = evaluate.DECISIONS[cfg.promotion_mode] if passed else "reject"
    evidence = {
        "incumbent": inc_name,
        "holdout_weeks": [w.isoformat() for w in weeks[-cfg.holdout_weeks :]],
        "training_weeks": [w.isoformat() for w in weeks[: -cfg.holdout_weeks]],
        "qini": qini,
        "auuc": {"challenger": auuc["challenger"], "incumbent": auuc["champion"]},
        "holdout": _counts(test),
        "top_half_uplift": {
            "challenger": uplift.uplift_at(s_ch, test.treated, test.y, 0.5),
            "incumbent": uplift.uplift_at(s_inc, test.treated, test.y, 0.5),
        },
    }
    version = _register(settings, uc, model, through, learn, evidence, checks, decision, run_id)
    held_out = ", ".join(w.isoformat() for w in weeks[-cfg.holdout_weeks :])
    failed = _failed(checks)
    out: dict[str, Any] = {
        "version": version,
        "decision": decision,
        "incumbent": inc_name,
        "evidence": evidence,
        "checks": checks,
        "reasons": failed or [f"all {len(checks)} checks passed"],
    }
    out["summary"] = summary(out)
    if decision == "promote":
        promote(
            settings,
            uc,
            version,
            actor="gates:auto",
            reason=f"out of time on {held_out}: {out['summary']}",
            run_id=run_id,
        )
    log.info("%s policy %s: %s (%s)", uc.name, version, decision, "; ".join(out["reasons"]))
    return out


def log_outcome(trained: dict[str, Any]) -> None:
    """Log what became of a challenger ``train_challenger`` returned, or why none was
    trained."""
    if trained["decision"] is None:
        log.info("no policy challenger: %s", trained["why"])
        return
    log.info("policy %s: %s; %s", trained["version"], trained["decision"], trained["summary"])
    for reason in trained["reasons"]:
        log.info("  %s", reason)


def _failed(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check that did not pass (the policy's gates)."""
    return [
        f"{c['name']}: expected {c['expected']}, found {c['found']}"
        for c in checks
        if not c["passed"]
    ]


def _too_few(weeks: int, needed: int, cfg: Any) -> str:
    return (
        f"{weeks} weekly cohort{'s have' if weeks != 1 else ' has'} matured; a policy needs "
        f"{needed} ({cfg.min_training_weeks} to learn from, {cfg.holdout_weeks} to test on)"
    )


def fit(uc: UseCase, data: Experiments) -> Model:
    """The use case's uplift learner (``campaign.policy.learner``) fitted on ``data``."""
    assert uc.campaign is not None
    cfg = uc.campaign.policy
    if cfg.learner == "two_model":
        return uplift.fit_two_model(data.frame, data.treated, data.y, seed=uc.model.seed)
    return uplift.fit_effect_model(data.frame, data.risk, data.treated, data.y, penalty=cfg.penalty)


def summary(out: dict[str, Any]) -> str:
    """The evidence in one sentence (shown to the approver and in the report)."""
    q = out["evidence"]["qini"]
    h = out["evidence"]["holdout"]
    return (
        f"Qini {q['challenger']['estimate']:+.4f} (95% CI {q['challenger']['low']:+.4f} .. "
        f"{q['challenger']['high']:+.4f}) vs {out['incumbent']} {q['champion']['estimate']:+.4f}; "
        f"difference {q['difference']['estimate']:+.4f} ({q['difference']['low']:+.4f} .. "
        f"{q['difference']['high']:+.4f}) on {h['contacted']:,} contacted and {h['control']:,} "
        "control held out"
    )


def _counts(data: Experiments) -> dict[str, int]:
    return {
        "contacted": int(data.treated.sum()),
        "contacted_positives": int(data.y[data.treated].sum()),
        "control": int((~data.treated).sum()),
        "control_positives": int(data.y[~data.treated].sum()),
    }


def _register(
    settings: Settings,
    uc: UseCase,
    model: Model,
    through: date,
    learn: Experiments,
    evidence: dict[str, Any],
    checks: list[dict[str, Any]],
    decision: str,
    run_id: str | None,
) -> str:
    blob = pickle.dumps(model, protocol=5)
    sha = train.registry_sha(blob)
    version = f"{uc.name}-uplift-{through:%Y%m%d}-{sha[:8]}"
    folder = private_dir(settings.artifacts / uc.name / "policies")
    artifact = folder / f"{version}.pkl"
    train._write_whole(artifact, blob)
    schema = [{"name": c, "dtype": str(learn.frame[c].dtype)} for c in learn.columns]
    training = {"weeks": evidence["training_weeks"], **_counts(learn)}
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO ml.policies (use_case, version, rank_by, trained_through, "
                "artifact_uri, sha256, feature_schema, training, evidence, checks, decision, "
                "run_id) VALUES (%s, %s, 'uplift', %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (use_case, version) DO UPDATE SET evidence = EXCLUDED.evidence, "
                "checks = EXCLUDED.checks, decision = EXCLUDED.decision, run_id = EXCLUDED.run_id",
                (
                    uc.name,
                    version,
                    through,
                    str(artifact),
                    sha,
                    json.dumps(schema),
                    json.dumps(training),
                    json.dumps(evidence, default=float),
                    json.dumps(checks),
                    decision,
                    run_id,
                ),
            )
        conn.commit()
    finally:
        conn.close()
    return version


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
                + "; ".join(_failed(newest["checks"]))
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
