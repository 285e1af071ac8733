"""Learn an audience policy from the campaigns' experiments (see ``pipeline.campaigns.policy``):
the data of every measured campaign, the out-of-time fit, the evidence against the policy
in force, the gates, and the challenger's registration."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from pipeline.campaigns import experiment, monitor, policy, selection, uplift
from pipeline.campaigns.campaign import published_run
from pipeline.conf.config import Settings, private_dir
from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.stages import evaluate, train
from pipeline.store import db

log = logging.getLogger(__name__)


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


def experiments(settings: Settings, uc: UseCase) -> Experiments | None:
    """Every measured campaign's first selections (``campaign_groups``; None when none has
    matured)."""

    measured = db.read_arrow(
        settings.database_url,
        "SELECT campaign, score_date FROM monitoring.campaign_uplift WHERE use_case = :uc "
        "ORDER BY score_date, campaign",
        {"uc": uc.name},
    ).to_pylist()
    parts, columns = [], None
    for m in measured:
        day = db.to_date(m["score_date"])
        groups = policy.campaign_groups(settings, uc, m["campaign"])
        groups = groups.filter(groups.column("first"))  # like with like: campaign_groups
        if not groups.num_rows:
            continue
        wanted = keys.to_numpy(groups.column(uc.entity_key))
        run = published_run(settings, uc, day)
        frame = selection.features_for(settings, uc, day, run, wanted)
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


def train_challenger(
    settings: Settings, uc: UseCase, as_of: date, run_id: str | None = None
) -> dict[str, Any]:
    """Train, evaluate out of time and gate an uplift policy from the matured campaigns.

    Returns ``{"decision": None, "why": ...}`` when there is nothing to do (``rank_by`` is
    risk, too few weeks, no campaign newer than the last policy's), else the registered
    version with its evidence, checks and decision (promoted now when ``auto``).
    """
    if uc.campaign is None or uc.campaign.policy.rank_by == policy.RISK:
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
    incumbent = policy.champion(settings, uc)
    s_ch = model.predict_uplift(test.frame, test.risk)
    if incumbent is None:
        s_inc, inc_name = test.risk, policy.RISK
    else:
        inc_model, _ = policy.load(settings, uc, incumbent["version"])
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
    checks = _checks(cfg, test, qini, inc_name)
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
    challenger = Challenger(
        model=model,
        through=through,
        learn=learn,
        evidence=evidence,
        checks=checks,
        decision=decision,
    )
    version = _register(settings, uc, challenger, run_id)
    held_out = ", ".join(w.isoformat() for w in weeks[-cfg.holdout_weeks :])
    failed = policy.failed_checks(checks)
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
        policy.promote(
            settings,
            uc,
            version,
            actor="gates:auto",
            reason=f"out of time on {held_out}: {out['summary']}",
            run_id=run_id,
        )
    log.info("%s policy %s: %s (%s)", uc.name, version, decision, "; ".join(out["reasons"]))
    return out


def _checks(
    cfg: Any, test: Experiments, qini: dict[str, Any], inc_name: str
) -> list[dict[str, Any]]:
    """The gates of a challenger whose Qini against the incumbent ``inc_name`` on the held
    out ``test`` is ``qini``."""
    control_positives = int(test.y[~test.treated].sum())
    return [
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


def log_outcome(trained: dict[str, Any]) -> None:
    """Log what became of a challenger ``train_challenger`` returned, or why none was
    trained."""
    if trained["decision"] is None:
        log.info("no policy challenger: %s", trained["why"])
        return
    log.info("policy %s: %s; %s", trained["version"], trained["decision"], trained["summary"])
    for reason in trained["reasons"]:
        log.info("  %s", reason)


def _too_few(weeks: int, needed: int, cfg: Any) -> str:
    return (
        f"{weeks} weekly cohort{'s have' if weeks != 1 else ' has'} matured; a policy needs "
        f"{needed} ({cfg.min_training_weeks} to learn from, {cfg.holdout_weeks} to test on)"
    )


def fit(uc: UseCase, data: Experiments) -> policy.Model:
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


@dataclass(frozen=True)
class Challenger:
    """A trained uplift policy with its out-of-time evidence and verdict, to register."""

    model: policy.Model
    through: date  # the newest weekly cohort it learned from or was tested on
    learn: Experiments  # what it learned from
    evidence: dict[str, Any]
    checks: list[dict[str, Any]]
    decision: str


def _register(settings: Settings, uc: UseCase, challenger: Challenger, run_id: str | None) -> str:
    """Write the challenger's artifact and its row of ``ml.policies``; returns its version."""
    blob = pickle.dumps(challenger.model, protocol=5)
    sha = train.registry_sha(blob)
    version = f"{uc.name}-uplift-{challenger.through:%Y%m%d}-{sha[:8]}"
    folder = private_dir(settings.artifacts / uc.name / "policies")
    artifact = folder / f"{version}.pkl"
    train._write_whole(artifact, blob)
    learn = challenger.learn
    schema = [{"name": c, "dtype": str(learn.frame[c].dtype)} for c in learn.columns]
    training = {"weeks": challenger.evidence["training_weeks"], **_counts(learn)}
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
                    challenger.through,
                    str(artifact),
                    sha,
                    json.dumps(schema),
                    json.dumps(training),
                    json.dumps(challenger.evidence, default=float),
                    json.dumps(challenger.checks),
                    challenger.decision,
                    run_id,
                ),
            )
        conn.commit()
    finally:
        conn.close()
    return version
