"""Tonight's challenger against the champion: the evaluation on the same holdout, the
gates' decision, the evaluation report, the promotion and a person's review of it.

Like every stage of the night (``pipeline.run.nightly``), each public function takes the
settings, the use case and the run's identity plus the small metadata earlier stages
returned, is recorded in the ledger, and returns small metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.core.errors import GateFailed
from pipeline.reports import report_site
from pipeline.stages import evaluate, features, score, train
from pipeline.store import ledger, registry
from pipeline.store.ledger import RunContext

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PROMOTION_MODES = ("auto", "approval", "never")


@dataclass(frozen=True)
class Scored:
    """The holdout's labels and both models' probabilities, row for row (no champion: None)."""

    y: np.ndarray
    challenger: np.ndarray
    champion: np.ndarray | None

    def rows(self, mask: np.ndarray) -> Scored:
        """The same rows' values where ``mask`` holds."""
        return Scored(
            self.y[mask],
            self.challenger[mask],
            None if self.champion is None else self.champion[mask],
        )


def evaluate_challenger(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    trained: dict[str, Any],
    promotion_mode: str = "auto",
    snapshot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare the challenger with the champion on the same out-of-time holdout dates.

    Both are scored on the pooled holdout dates neither trained on; every metric, the
    paired evidence and each gate check are stored in ``ml.evaluations`` with an HTML
    report. Decision: ``promote`` (all checks pass, mode auto: promoted now),
    ``awaiting_approval`` (pass, mode approval), ``shadow`` (pass, mode never), ``reject``,
    or ``identical`` (the challenger has the champion's artifact bytes: nothing to compare,
    nothing to ask anyone). A challenger that is not promoted becomes the shadow model.
    """
    if promotion_mode not in PROMOTION_MODES:
        raise GateFailed(
            f"promotion_mode must be one of {PROMOTION_MODES}, found {promotion_mode!r}"
        )
    with ledger.stage(settings, run, "evaluate_challenger") as info:
        champ = registry.champion(settings, uc.name)
        if champ is not None and champ.sha256 == trained["sha256"]:
            evaluation = _identical(uc, trained, champ.version)
            report_path = report_site.evaluation_file(settings, uc.name, champ.version)
        else:
            evaluation, report_path = _judge(
                settings, uc, run, trained, champ, promotion_mode, snapshot
            )
        _record_evaluation(settings, uc, run, trained, evaluation, report_path)
        for check in evaluation.checks:
            log.log(
                logging.INFO if check["passed"] else logging.WARNING,
                "gate %s",
                evaluate.describe(check),
            )
        if evaluation.decision == "promote":
            registry.promote(
                settings,
                uc.name,
                evaluation.challenger,
                actor=f"nightly:{run.run_id}",
                reason="; ".join(evaluation.reasons),
                effective_date=run.score_date,
                run_id=run.run_id,
            )
        elif evaluation.decision != "identical":
            registry.set_shadow(settings, uc.name, evaluation.challenger)
        ch = evaluation.metrics["challenger"]
        champ_metrics = evaluation.metrics["champion"]
        info |= {
            "decision": evaluation.decision,
            "reasons": evaluation.reasons,
            "challenger_auc": ch["roc_auc"] if ch else None,
            "champion_auc": champ_metrics["roc_auc"] if champ_metrics else None,
            "report": str(report_path),
        }
        log.info(
            "evaluation of %s: %s (%s)",
            evaluation.challenger,
            evaluation.decision,
            "; ".join(evaluation.reasons),
        )
        log.info(
            "evaluation report: file://%s (Airflow UI: <base_url>/%s)",
            report_path,
            report_site.evaluation_path(uc.name, evaluation.challenger),
        )
    report_url = report_site.evaluation_path(uc.name, evaluation.challenger)
    return {
        "version": evaluation.challenger,
        "champion": evaluation.champion,
        "decision": evaluation.decision,
        "reasons": evaluation.reasons,
        "report": str(report_path),
        "report_url": report_url,
        # relative: the Airflow UI resolves it against its base URL, where the plugin serves it
        "summary": evaluation.summary_markdown(report_url),
    }


def _identical(uc: UseCase, trained: dict[str, Any], champion: str) -> evaluate.Evaluation:
    """The challenger is the champion's artifact, byte for byte: no gate to run."""
    return evaluate.Evaluation(
        use_case=uc.name,
        challenger=champion,
        champion=champion,
        holdouts=[],
        verdict=None,
        decision="identical",
        reasons=[
            f"identical to {champion}, the champion: tonight's training gave the same artifact "
            f"bytes (sha256 {trained['sha256'][:16]}); nothing to promote or compare"
        ],
        same_as=champion,
    )


def _judge(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    trained: dict[str, Any],
    champ: registry.ModelVersion | None,
    promotion_mode: str,
    snapshot: dict[str, Any] | None,
) -> tuple[evaluate.Evaluation, Any]:
    """Score both models on the pooled holdout, run the gates, write the report."""
    import numpy as np

    from pipeline.campaigns import monitor

    holdouts = [features.Snapshot.from_xcom(h) for h in trained["holdouts"]]
    table = features.read_pooled(holdouts)
    y = table.column("label").to_numpy()
    dates = table.column(features.HOLDOUT_DATE).to_numpy()
    challenger, mv = registry.load_model(settings, uc.name, trained["version"])
    p_ch = train.predict(challenger, table, [f["name"] for f in mv.feature_schema])
    p_champ = None
    compared = np.ones(len(y), dtype=bool)
    decayed = None
    if champ is not None:
        champ_model, _ = registry.load_model(settings, uc.name, champ.version)
        p_champ = train.predict(champ_model, table, [f["name"] for f in champ.feature_schema])
        compared = _out_of_time(uc, champ, dates)
        decayed = monitor.champion_decay(settings, uc, champ.version, run.score_date)
    schema_problems = []
    if snapshot is not None:
        import pyarrow.parquet as pq

        scoring_schema = pq.read_schema(features.Snapshot.from_xcom(snapshot).path)
        schema_problems = score.schema_problems(scoring_schema, mv.feature_schema)
    used = sorted({h.as_of for h in holdouts if compared[dates == np.datetime64(h.as_of)].any()})
    pooled = len(used) > 1
    keys_of = keys.to_numpy(table.column(uc.entity_key)) if pooled else None
    verdict = evaluate.judge(
        uc.gates,
        y[compared],
        p_ch[compared],
        None if p_champ is None else p_champ[compared],
        entity=None if keys_of is None else keys_of[compared],
        capacity=uc.capacity,
        decayed=decayed,
        schema_problems=schema_problems,
        holdout_dates=len(used),
    )
    decision = evaluate.DECISIONS[promotion_mode] if verdict.passed else "reject"
    same_as = trained["version"] if trained.get("registered_before") else None
    reasons = verdict.failed or [_passed_text(verdict, champ, decayed)]
    if same_as:
        reasons.append(
            f"identical to {same_as}, registered before: the same artifact bytes, judged again "
            "on tonight's holdout"
        )
    evaluation = evaluate.Evaluation(
        use_case=uc.name,
        challenger=trained["version"],
        champion=champ.version if champ else None,
        holdouts=[
            {
                "as_of": h.as_of.isoformat(),
                "sha256": h.sha256,
                "rows": int((dates == np.datetime64(h.as_of)).sum()),
                "positives": int(y[dates == np.datetime64(h.as_of)].sum()),
                "compared": h.as_of in used,
            }
            for h in holdouts
        ],
        verdict=verdict,
        decision=decision,
        reasons=reasons,
        decayed=decayed,
        same_as=same_as,
    )
    scored = Scored(y, p_ch, p_champ)
    extras = _evaluation_extras(uc, mv, challenger, table, scored)
    report_path = _write_report(settings, evaluation, scored.rows(compared), extras)
    return evaluation, report_path


def _out_of_time(uc: UseCase, champ: registry.ModelVersion, dates: Any) -> Any:
    """Rows of holdout dates the champion never trained on: dates on or after its newest
    training snapshot's label window closed. Every row when none qualifies (a champion
    trained after the whole holdout), with a warning."""
    import numpy as np

    trained_on = [s["as_of"] for s in champ.training_window.get("snapshots", [])]
    if not trained_on:
        return np.ones(len(dates), dtype=bool)
    closed = features.label_end(uc, date.fromisoformat(max(trained_on)))
    mask = dates >= np.datetime64(closed)
    if not mask.any():
        log.warning(
            "every holdout date precedes the end of %s's training labels (%s): the champion is "
            "judged on rows it may have learned from",
            champ.version,
            closed,
        )
        return np.ones(len(dates), dtype=bool)
    return mask


def _passed_text(
    verdict: evaluate.Verdict, champ: registry.ModelVersion | None, decayed: str | None
) -> str:
    text = f"all {len(verdict.checks)} checks passed"
    if champ is None:
        return text + " (first model: no champion to compare with)"
    gain = verdict.evidence["log_loss_gain"]
    text += (
        f": {gain['confidence']:.1%} likely better than {champ.version} on log loss "
        f"(gain {gain['estimate']:+.5f}, 95% CI {gain['low']:+.5f} .. {gain['high']:+.5f})"
    )
    if decayed:
        text += f"; the champion has decayed and was not shown better ({decayed})"
    return text


def _write_report(
    settings: Settings, evaluation: evaluate.Evaluation, scored: Scored, extras: dict[str, Any]
) -> Any:
    from pipeline.reports import evaluation_report

    return evaluation_report.write_evaluation_report(
        report_site.evaluation_file(settings, evaluation.use_case, evaluation.challenger),
        evaluation,
        y=scored.y,
        p_challenger=scored.challenger,
        p_champion=scored.champion,
        **extras,
    )


def _evaluation_extras(
    uc: UseCase, mv: registry.ModelVersion, model: Any, table: Any, scored: Scored
) -> dict[str, Any]:
    """The evaluation report's model card, permutation importance (bounded sample) and
    per-segment metrics of the challenger on the holdout."""
    columns = [f["name"] for f in mv.feature_schema]
    frame = train.to_frame(table, columns)
    importance = evaluate.permutation_importance(
        lambda f: train.predict_frame(model, f), frame, scored.y, seed=uc.model.seed
    )
    segments = {
        column: evaluate.segment_metrics(
            table.column(column).to_numpy(zero_copy_only=False),
            scored.y,
            scored.challenger,
            scored.champion,
        )
        for column in uc.report.segments
        if column in table.column_names
    }
    card = {
        k: v for k, v in registry.card(mv).items() if k != "reference"
    }  # drift profile: too long
    return {"card": card, "importance": importance, "segments": segments}


def _record_evaluation(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    trained: dict[str, Any],
    evaluation: evaluate.Evaluation,
    report_path: Any,
) -> None:
    import json

    newest = (trained.get("holdouts") or [{}])[-1]
    ledger.db_exec(
        settings,
        """
        INSERT INTO ml.evaluations (use_case, challenger, champion, holdout_as_of, holdout_sha256,
            holdout_dates, metrics, intervals, checks, decision, reasons, decayed, report_path,
            run_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            uc.name,
            evaluation.challenger,
            evaluation.champion,
            newest.get("as_of", run.score_date),
            newest.get("sha256", ""),
            json.dumps(evaluation.holdouts),
            json.dumps(evaluation.metrics),
            json.dumps(evaluation.evidence),
            json.dumps(evaluation.checks),
            evaluation.decision,
            json.dumps(evaluation.reasons),
            evaluation.decayed,
            str(report_path),
            run.run_id,
        ),
    )


def promote_challenger(
    settings: Settings, uc: UseCase, run: RunContext, version: str, actor: str, reason: str
) -> dict[str, Any]:
    """Promote a challenger a person approved (the approval path of ``promotion_mode``)."""
    with ledger.stage(settings, run, "promote_challenger") as info:
        previous = registry.promote(
            settings,
            uc.name,
            version,
            actor=actor,
            reason=reason,
            effective_date=run.score_date,
            run_id=run.run_id,
        )
        info |= {"version": version, "previous": previous, "actor": actor}
    return {"version": version, "previous": previous}


def record_review(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    evaluation: dict[str, Any],
    answer: dict[str, Any],
) -> dict[str, Any]:
    """Record a person's answer to the approval of ``evaluation`` (what
    ``evaluate_challenger`` returned): decision, who and when into ``ml.evaluations``, and
    a sentence for the run's note, the night's report and the log, e.g. "Rejected by admin
    at 2026-12-06 09:04 UTC; <version> kept as shadow"."""
    review = registry.Review.from_hitl(answer)
    with ledger.stage(settings, run, "record_review") as info:
        registry.record_review(
            settings, "ml.evaluations", uc.name, evaluation["version"], run.run_id, review
        )
        champion = evaluation.get("champion")
        outcome = (
            f"promoted (was {champion or 'no champion'})"
            if review.approved
            else f"kept as shadow; {champion or 'no model'} stays champion"
        )
        note = review.text(evaluation["version"], outcome)
        info |= {"review": review.decision, "by": review.by, "note": note}
    log.log(logging.INFO if review.approved else logging.WARNING, "%s", note)
    return {"decision": review.decision, "by": review.by, "note": note}
