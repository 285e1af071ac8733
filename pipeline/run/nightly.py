"""The nightly run, stage by stage: one function per Airflow task, each recorded in the ledger.

Every function takes the settings, the use case and the run's identity, plus the small
metadata earlier stages returned (paths, versions, hashes), and returns small metadata.
The DAG wires them; ``run_night`` chains them in-process for the CLI and the tests.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pipeline.conf import contract
from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import keys, progress
from pipeline.core.errors import GateFailed, ModelError
from pipeline.core.faults import fault_point
from pipeline.reports import report_site
from pipeline.stages import (
    checks,
    evaluate,
    features,
    publish,
    score,
    source_days,
    sources,
    train,
    windows,
)
from pipeline.store import db, ledger, registry, serving
from pipeline.store.ledger import RunContext

log = logging.getLogger(__name__)

PROMOTION_MODES = ("auto", "approval", "never")
RETRAIN_MODES = ("scheduled", "always", "never")
REPORT_CAMPAIGNS = 10  # newest campaign uplifts shown in the nightly report
REPORT_SAMPLE_ROWS = 200_000  # published scores read for the report's segment view, at most
REPORT_SEGMENT_VALUES = 20  # most frequent values shown per segment column


def start_run(
    settings: Settings, uc: UseCase, run: RunContext, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Open the run's ledger row (with its params) and note the champion as the run starts.

    Refuses before any work when the use case's serving objects do not exist yet.
    """
    serving.require(settings, uc)
    attempt = ledger.start(settings, run, params, ledger.code_version(uc))
    champ = registry.champion(settings, uc.name)
    info = run.as_xcom() | {
        "champion_at_start": champ.version if champ else None,
        "attempt": attempt,
    }
    ledger.record_stage(settings, run, "start_run", {"status": "ok", **info})
    log.info(
        "run %s started for %s as of %s (code %s, champion %s)",
        run.run_id,
        uc.name,
        run.score_date,
        ledger.code_version(uc),
        info["champion_at_start"],
    )
    return info


def waiting_for_data(settings: Settings, uc: UseCase, day: date) -> list[str]:
    """What the night of ``day`` waits for before it can start (see ``sources.waiting_for``);
    empty once the contract's ``fresh`` tables hold rows through the day before."""
    spec = contract.load_contract(uc.contract)
    return sources.waiting_for(
        settings.warehouse_url, settings.warehouse_schema, spec, day, uc.warehouse.timezone
    )


def source_lookback(uc: UseCase, spec: contract.Contract) -> dict[str, int]:
    """Per source table, the days before the run date whose rows and content the source
    checks keep: its lookback, and every day a kept block (windows, states) reads."""
    kept = windows.spans(uc)
    return {t: spec.lookback(t, kept) for t in spec.tables}


def check_sources(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Source contract, freshness, volume, value rules, keys and nulls, before featurizing;
    and history: the past days each table is read back to (its lookback: the contract's
    ``lookback_days``, the windows kept over it) as an earlier night saw them, by rows and
    content (``history_unchanged``)."""
    with ledger.stage(settings, run, "check_sources") as info:
        spec = contract.load_contract(uc.contract)
        lookback = source_lookback(uc, spec)
        seen = sources.observe(
            settings.warehouse_url,
            settings.warehouse_schema,
            spec,
            run.score_date,
            uc.warehouse.timezone,
            uc.entity_key,
            history_days=lookback,
            session=uc.warehouse.settings,
        )
        earlier, before = checks.previous_source_days(settings, run)
        results = seen.results
        if earlier is not None:
            results += source_days.rewritten_days(
                before,
                earlier,
                seen.days,
                settings.warehouse_schema,
                spec,
                since={t: run.score_date - timedelta(days=n) for t, n in lookback.items()},
            )
        checks.store_source_days(settings, run, seen.days)
        info |= checks.record_and_gate(settings, run, results, "source")
    return info


def check_features(
    settings: Settings, uc: UseCase, run: RunContext, snapshot: dict[str, Any]
) -> dict[str, Any]:
    """Keys, nulls, ranges and population size of tonight's snapshot; drift vs the champion
    in force on the night's date (``champion_on``: a backfill compares with the model of
    its date, never with one trained later).

    Features drifting beyond ``feature_psi_limit`` only warn, and request a retrain when
    that model is still the champion.
    """
    with ledger.stage(settings, run, "check_features") as info:
        snap = features.Snapshot.from_xcom(snapshot)
        table = features.read_snapshot(snap)
        previous = db.scalar(
            settings.database_url,
            "SELECT rows FROM ml.publications WHERE use_case = %s AND score_date < %s "
            "ORDER BY score_date DESC LIMIT 1",
            (uc.name, run.score_date),
        )
        # as of the night: the champion in force on its date (a backfill's, not today's)
        version = registry.champion_on(settings, uc.name, run.score_date)
        champ = registry.get(settings, uc.name, version) if version else None
        reference = registry.card(champ).get("reference") if champ else None
        results = checks.check_features(table, uc, previous, reference)
        info |= checks.record_and_gate(settings, run, results, "feature")
        info["drift_reference"] = champ.version if champ else None
        drifted: dict[str, list[str]] = {}
        for r in results:
            if r.check in ("feature_psi", "unseen_categories") and not r.passed:
                drifted.setdefault(r.target, []).append(r.check)
        current = registry.champion(settings, uc.name)
        if drifted and champ is not None and current is not None:
            found = "; ".join(f"{name} ({', '.join(c)})" for name, c in drifted.items())
            if current.version == champ.version:
                # "retrain on drift": the cadence gives way to a request the next decision honours
                registry.request_retrain(
                    settings,
                    uc.name,
                    f"features drifted from {champ.version}'s training data on "
                    f"{run.score_date}: {found}",
                )
            else:  # a past night's model has since been replaced: nothing to retrain now
                log.info(
                    "%s %s: features drifted from %s's training data (%s); %s has replaced "
                    "it since, so no retrain is requested",
                    uc.name,
                    run.score_date,
                    champ.version,
                    found,
                    current.version,
                )
    return info


def check_scores(
    settings: Settings, uc: UseCase, run: RunContext, parts: list[dict[str, Any]]
) -> dict[str, Any]:
    """Scores are finite; their distribution vs the previous published night (drift)."""
    import numpy as np
    import pyarrow.parquet as pq

    with ledger.stage(settings, run, "check_scores") as info:
        probs = np.concatenate(
            [
                pq.read_table(score.ScoredPart.from_xcom(p).path, columns=[uc.probability_column])
                .column(0)
                .to_numpy()
                for p in parts
            ]
        )
        previous = checks.previous_score_histogram(settings, uc, run.score_date)
        info |= checks.record_and_gate(
            settings, run, checks.score_psi_check(uc, probs, previous), "score"
        )
    return info


def build_features(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Snapshot the features of the population as of the score date."""
    with ledger.stage(settings, run, "build_features") as info, ThreadPoolExecutor(1) as pool:
        counting = None
        if uc.sql.source_counts is not None:  # on its own connection, beside the features
            counting = pool.submit(
                db.read_arrow,
                settings.warehouse_url,
                features.query(uc, "source_counts"),
                {"as_of": run.score_date},
                schema=settings.warehouse_schema,
            )
        snap = features.build_snapshot(settings, uc, run.score_date, seen=_seen(settings, uc, run))
        counts = counting.result().to_pylist() if counting is not None else []
        info |= {"rows": snap.rows, "sha256": snap.sha256}
        if snap.windows:
            info["windows"] = list(snap.windows)
        ledger.update(
            settings,
            run,
            snapshot_sha256=snap.sha256,
            source_counts={
                c["source"]: {"rows": c["rows_before"], "last_day": c["rows_last_day"]}
                for c in counts
            },
        )
    return snap.as_xcom()


def _seen(settings: Settings, uc: UseCase, run: RunContext) -> windows.Seen:
    """What this run's source checks counted per day of each table, from the first day
    they keep (``source_lookback``)."""
    lookback = source_lookback(uc, contract.load_contract(uc.contract))
    return {
        table: (run.score_date - timedelta(days=lookback[table]), days)
        for table, days in checks.source_days(settings, run).items()
        if table in lookback
    }


def decide_retrain(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    mode: str = "scheduled",
    backfill: bool = False,
) -> dict[str, Any]:
    """Whether tonight trains a challenger, and why.

    ``always``/``never`` force it. ``scheduled`` retrains when there is no champion, when
    the champion is ``retrain_every_days`` old or more, or when a monitor asked for it;
    backfills never retrain on schedule (only with ``always``).
    """
    if mode not in RETRAIN_MODES:
        raise GateFailed(f"retrain must be one of {RETRAIN_MODES}, found {mode!r}")
    champ = registry.champion(settings, uc.name)
    requests = registry.open_retrain_requests(settings, uc.name)
    if mode != "scheduled":
        retrain, why = mode == "always", f"retrain={mode}"
    elif backfill:
        retrain, why = (
            False,
            "backfill: scoring with the champion of each date (retrain=always to train)",
        )
    elif champ is None:
        retrain, why = True, "no champion yet"
    elif requests:
        retrain, why = True, "retrain requested: " + "; ".join(requests)
    else:
        age = (run.score_date - champ.trained_as_of).days
        every = uc.training.retrain_every_days
        retrain = age >= every
        why = f"champion trained {age} days ago; cadence every {every} days"
    if retrain and requests:
        registry.consume_retrain_requests(settings, uc.name, run.run_id)
    ledger.record_stage(
        settings, run, "decide_retrain", {"status": "ok", "retrain": retrain, "why": why}
    )
    log.info("%s %s: retrain=%s (%s)", uc.name, run.score_date, retrain, why)
    return {"retrain": retrain, "why": why}


def train_challenger(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Train a challenger on matured snapshots; out-of-time metrics on the holdout."""
    with ledger.stage(settings, run, "train_challenger") as info:
        trained = train.train_challenger(settings, uc, run.score_date, ledger.code_version(uc))
        info |= {
            "version": trained.version,
            "roc_auc": trained.metrics["roc_auc"],
            "snapshots_reused": trained.snapshots_reused,
            "training_rows": trained.card["training_window"]["training_rows"],
        }
    return trained.as_xcom()


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
    extras = _evaluation_extras(registry.card(mv), challenger, mv, table, y, p_ch, p_champ, uc)
    report_path = _write_report(
        settings,
        evaluation,
        y[compared],
        p_ch[compared],
        None if p_champ is None else p_champ[compared],
        extras,
    )
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
    settings: Settings,
    evaluation: evaluate.Evaluation,
    y: Any,
    p_ch: Any,
    p_champ: Any,
    extras: dict[str, Any],
) -> Any:
    from pipeline.reports import report

    return report.write_evaluation_report(
        report_site.evaluation_file(settings, evaluation.use_case, evaluation.challenger),
        evaluation,
        y=y,
        p_challenger=p_ch,
        p_champion=p_champ,
        **extras,
    )


def _evaluation_extras(
    card: dict[str, Any],
    model: Any,
    mv: registry.ModelVersion,
    table: Any,
    y: Any,
    p_ch: Any,
    p_champ: Any,
    uc: UseCase,
) -> dict[str, Any]:
    """The evaluation report's model card, permutation importance (bounded sample) and
    per-segment metrics of the challenger on the holdout."""
    columns = [f["name"] for f in mv.feature_schema]
    frame = train.to_frame(table, columns)
    importance = evaluate.permutation_importance(
        lambda f: train.predict_frame(model, f), frame, y, seed=uc.model.seed
    )
    segments = {
        column: evaluate.segment_metrics(
            table.column(column).to_numpy(zero_copy_only=False), y, p_ch, p_champ
        )
        for column in uc.report.segments
        if column in table.column_names
    }
    card = {k: v for k, v in card.items() if k != "reference"}  # the drift profile: too long
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


BACKFILL_MODELS = ("champion_on_date", "current_champion")


def no_champion_message(settings: Settings, uc: UseCase, run: RunContext) -> str:
    """Why there is no model to score with: the newest evaluation's decision and reasons."""
    ev = db.scalar(
        settings.database_url,
        "SELECT json_build_object('challenger', challenger, 'decision', decision, 'reasons', "
        "reasons, 'run_id', run_id, 'report', report_path) FROM ml.evaluations "
        "WHERE use_case = %s ORDER BY (run_id = %s) DESC, created_at DESC LIMIT 1",
        (uc.name, run.run_id),
    )
    head = f"no champion model for use case {uc.name!r}, so nothing was scored"
    if ev is None:
        return (
            f"{head}: no challenger has been trained yet; run with retrain=always (a challenger "
            "that passes the gates becomes the first champion), or promote a registered version "
            f"with `nightscore models promote VERSION --use-case {uc.name} --reason ...`"
        )
    when = "tonight" if ev["run_id"] == run.run_id else f"by run {ev['run_id']}"
    why = "; ".join(ev["reasons"] or [])
    return (
        f"{head}: the challenger {ev['challenger']} trained {when} was not promoted "
        f"(decision {ev['decision']}): {why}. The gates are in {uc.source} (gates.auc_floor "
        f"{uc.gates.auc_floor}, gates.lift_floor {uc.gates.lift_floor}, "
        f"gates.min_holdout_positives {uc.gates.min_holdout_positives}); more history or a "
        "longer training window (training.snapshots, training.step_days) gives the model more "
        f"to learn from. To serve it anyway: `nightscore models promote {ev['challenger']} "
        f"--use-case {uc.name} --reason ...`. Evaluation report: {ev['report']}"
    )


def select_model(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    rescore_model: str | None = None,
    champion_at_start: str | None = None,
    *,
    backfill: bool = False,
    backfill_model: str = "champion_on_date",
) -> dict[str, Any]:
    """Pin the one model this run scores with.

    In order: an explicit ``rescore_model``; the challenger this very run promoted; in a
    backfill, the champion in force on the score date (from the promotions log) unless
    ``backfill_model="current_champion"``; otherwise the champion when the run started.
    A promotion or rollback made elsewhere while the run is going never changes it.
    """
    if backfill_model not in BACKFILL_MODELS:
        raise GateFailed(
            f"backfill_model must be one of {BACKFILL_MODELS}, found {backfill_model!r}"
        )
    with ledger.stage(settings, run, "select_model") as info:
        promoted = registry.promoted_by_run(settings, uc.name, run.run_id)
        version: str | None
        if rescore_model:
            version, why = rescore_model, "rescore_model"
        elif promoted:
            version, why = promoted, "promoted tonight"
        elif backfill and backfill_model == "champion_on_date":
            version = registry.champion_on(settings, uc.name, run.score_date)
            why = f"champion on {run.score_date} (promotions log)"
            if version is None:
                raise ModelError(
                    f"no {uc.name} model was champion on {run.score_date} (the promotions log starts "
                    "later); backfill with backfill_model=current_champion to rescore with today's"
                )
        else:
            version, why = champion_at_start, "champion at run start"
        if version is None:
            raise ModelError(no_champion_message(settings, uc, run))
        mv = registry.get(settings, uc.name, version)
        ledger.update(settings, run, model_version=mv.version)
        info |= {"model_version": mv.version, "why": why}
    return {"model_version": mv.version, "sha256": mv.sha256}


def score_partition(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    snapshot: dict[str, Any],
    model_version: str,
    partition: int,
) -> dict[str, Any]:
    """Score one hash partition of the population."""
    with ledger.stage(settings, run, f"score_partition_{partition}") as info:
        fault_point("score_partition", partition)
        part = score.score_partition(
            settings,
            uc,
            features.Snapshot.from_xcom(snapshot),
            model_version,
            partition,
            uc.serving.partitions,
            run.run_id,
        )
        info |= {"rows": part.rows} | part.predictor.as_info()
    return part.as_xcom()


def score_partitions(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    snapshot: dict[str, Any],
    model_version: str,
) -> list[dict[str, Any]]:
    """Score every partition in this process (the CLI's night): as many at once as the CPU
    allowance has cores (each takes its share of the OpenMP threads, as a mapped task does)."""
    n = uc.serving.partitions
    workers = max(1, min(n, train.cpu_allowance()))
    with (
        progress.stage("score_partitions", total=n, unit="partitions") as shown,
        ThreadPoolExecutor(workers, thread_name_prefix="score") as pool,
    ):
        futures = [
            pool.submit(score_partition, settings, uc, run, snapshot, model_version, p)
            for p in range(n)
        ]
        parts = []
        for future in futures:
            parts.append(future.result())
            shown.advance()
    return parts


score_partitions.shows_progress = True  # type: ignore[attr-defined]


def publish_scores(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    snapshot: dict[str, Any],
    model_version: str,
    parts: list[dict[str, Any]],
    dry_run: bool = False,
) -> dict[str, Any]:
    """Publish the scored partitions atomically (or only validate counts on a dry run)."""
    scored = sorted((score.ScoredPart.from_xcom(p) for p in parts), key=lambda p: p.partition)
    expected = int(snapshot["rows"])
    with ledger.stage(settings, run, "publish_scores") as info:
        found = sum(p.rows for p in scored)
        if found != expected or len(scored) != uc.serving.partitions:
            raise GateFailed(
                f"scored {found} rows in {len(scored)} partitions, expected {expected} rows in "
                f"{uc.serving.partitions}: a partition is missing or incomplete; nothing was published"
            )
        if dry_run:
            ledger.update(settings, run, status="dry_run")
            info |= {"rows": found, "dry_run": True}
            return {"rows": found, "dry_run": True}
        result = publish.publish_scores(settings, uc, run, model_version, scored, expected)
        fault_point("after_publish")
        dropped = publish.apply_retention(settings, uc, run, uc.serving.retention_dates)
        info |= result.as_xcom() | {"retention_dropped": [str(d) for d in dropped]}
    return result.as_xcom()


def score_shadow(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    snapshot: dict[str, Any],
    model_version: str,
    parts: list[dict[str, Any]],
) -> dict[str, Any]:
    """Score tonight's population with the shadow model and record its agreement.

    The shadow model is the newest challenger that was not promoted. Its scores go to the
    shadow table only; the agreement with the served model is kept per night.
    """
    with ledger.stage(settings, run, "score_shadow") as info:
        fault_point("score_shadow")
        shadow = registry.shadow(settings, uc.name)
        if shadow is None or shadow.version == model_version:
            info |= {"skipped": True, "why": "no shadow model"}
            return {"shadow": None}
        import numpy as np
        import pyarrow.parquet as pq

        part = score.score_partition(
            settings,
            uc,
            features.Snapshot.from_xcom(snapshot),
            shadow.version,
            0,
            1,
            f"{run.run_id}-shadow",
        )
        rows = publish.publish_shadow(settings, uc, run, shadow.version, part)
        served = [pq.read_table(score.ScoredPart.from_xcom(p).path) for p in parts]
        entity_keys = np.concatenate([keys.to_numpy(t.column(uc.entity_key)) for t in served])
        probs = np.concatenate([t.column(uc.probability_column).to_numpy() for t in served])
        shadow_table = pq.read_table(part.path)
        s_keys = keys.to_numpy(shadow_table.column(uc.entity_key))
        s_probs = shadow_table.column(uc.probability_column).to_numpy()
        order, s_order = np.argsort(entity_keys), np.argsort(s_keys)
        if not np.array_equal(entity_keys[order], s_keys[s_order]):
            raise GateFailed(
                "shadow and served scores cover different entities; the snapshot changed mid-run"
            )
        capacity = uc.capacity or max(1, len(probs) // 10)
        agree = evaluate.agreement(probs[order], s_probs[s_order], capacity)
        ledger.db_exec(
            settings,
            """
            INSERT INTO monitoring.shadow_agreement (use_case, score_date, champion, shadow, rows, spearman,
                top_decile_overlap, audience_capacity, audience_enter, audience_leave, run_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (use_case, score_date, shadow) DO UPDATE SET
                champion = EXCLUDED.champion, rows = EXCLUDED.rows, spearman = EXCLUDED.spearman,
                top_decile_overlap = EXCLUDED.top_decile_overlap,
                audience_capacity = EXCLUDED.audience_capacity, audience_enter = EXCLUDED.audience_enter,
                audience_leave = EXCLUDED.audience_leave, run_id = EXCLUDED.run_id, recorded_at = now()
            """,
            (
                uc.name,
                run.score_date,
                model_version,
                shadow.version,
                rows,
                agree["spearman"],
                agree["top_decile_overlap"],
                int(agree["audience_capacity"]),
                int(agree["audience_enter"]),
                int(agree["audience_leave"]),
                run.run_id,
            ),
        )
        info |= {"shadow": shadow.version, **agree}
    return {"shadow": shadow.version, **agree}


def write_report(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """The night's HTML report: score distribution, drift, checks, realized performance.

    Also the newest ``REPORT_CAMPAIGNS`` campaign uplifts whose labels matured by the night.
    A report that cannot be written fails the run, never un-serves the night.
    """
    with ledger.stage(settings, run, "write_report") as info:
        fault_point("write_report")
        path = _night_report(settings, uc, run)
        info["report"] = str(path)
    log.info(
        "nightly report: file://%s (Airflow UI: <base_url>/%s)",
        path,
        report_site.report_path(uc.name, run.score_date),
    )
    return {"report": str(path)}


def _night_report(settings: Settings, uc: UseCase, run: RunContext) -> Any:
    from pipeline.reports import report

    def rows(cur: Any) -> list[dict[str, Any]]:
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def first(cur: Any, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        cur.execute(query, params)
        return next(iter(rows(cur)), None)

    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            ledger_row = first(
                cur,
                "SELECT run_id, attempt, status, error, stages, snapshot_sha256, code_version, "
                "model_version, rows_published FROM ml.runs WHERE use_case = %s AND run_id = %s",
                (uc.name, run.run_id),
            )
            # what readers get now (the *_latest views), and what this date has published
            served = first(
                cur,
                "SELECT score_date, model_version, run_id, rows FROM ml.publications "
                "WHERE use_case = %s ORDER BY score_date DESC LIMIT 1",
                (uc.name,),
            )
            published = first(
                cur,
                "SELECT score_date, model_version, run_id, rows FROM ml.publications "
                "WHERE use_case = %s AND score_date = %s",
                (uc.name, run.score_date),
            )
            evaluation = first(
                cur,
                "SELECT challenger, decision, reasons, reviewed_by, reviewed_at FROM ml.evaluations "
                "WHERE use_case = %s AND run_id = %s "
                "ORDER BY created_at DESC LIMIT 1",
                (uc.name, run.run_id),
            )
            cur.execute(
                "SELECT max(score_date) FROM ml.runs WHERE use_case = %s AND score_date < %s",
                (uc.name, run.score_date),
            )
            previous_night = cur.fetchone()[0]
            cur.execute(
                "SELECT max(attempt) FROM ml.runs WHERE use_case = %s AND score_date = %s",
                (uc.name, run.score_date),
            )
            newest_attempt = cur.fetchone()[0]
            cur.execute(
                "SELECT shadow, champion, rows, spearman, top_decile_overlap, audience_capacity, "
                "audience_enter, audience_leave FROM monitoring.shadow_agreement "
                "WHERE use_case = %s AND score_date = %s ORDER BY recorded_at DESC",
                (uc.name, run.score_date),
            )
            shadow = rows(cur)
            cur.execute(
                "SELECT feature, psi, within_limit FROM monitoring.drift WHERE run_id = %s",
                (run.run_id,),
            )
            drift = [(str(f), float(p), bool(ok)) for f, p, ok in cur.fetchall()]
            cur.execute(
                "SELECT check_name, target, severity, passed, expected, found FROM monitoring.checks "
                "WHERE run_id = %s",
                (run.run_id,),
            )
            found_checks = rows(cur)
            # matured by this night: a backfilled or rewritten report shows no later campaign
            cur.execute(
                "SELECT campaign, score_date, contacted, contacted_positives, control, control_positives, "
                "contacted_rate, control_rate, uplift, ci_low, ci_high FROM monitoring.campaign_uplift "
                "WHERE use_case = %s AND score_date + %s <= %s "
                "ORDER BY score_date DESC, campaign DESC LIMIT %s",
                (uc.name, uc.label.horizon_days, run.score_date, REPORT_CAMPAIGNS),
            )
            uplift = rows(cur)
        conn.commit()
    finally:
        conn.close()
    from pipeline.campaigns import monitor

    realized = monitor.matured_performance(settings, uc, run.score_date)
    segments, segment_note = _segment_scores(settings, uc, run, ledger_row, published)
    context = report.NightContext(
        run=ledger_row,
        served=served,
        published=published,
        evaluation=evaluation,
        previous_night=previous_night,
        shadow=shadow,
        segments=segments,
        segment_note=segment_note,
        decay_threshold=uc.monitoring.decay_threshold,
        airflow_run=report_site.airflow_run_path(uc.name, run.run_id),
        campaign=_campaign_state(settings, uc, run.score_date),
    )
    # each attempt of a date keeps its report; the date's own file is its newest attempt's
    attempt = ledger_row["attempt"] if ledger_row else None
    written = report.write_run_report(
        report_site.night_file(settings, uc.name, run.score_date, attempt),
        use_case=uc.name,
        score_date=run.score_date,
        model_version=ledger_row["model_version"] if ledger_row else None,
        score_hist=checks.score_histogram(settings, uc, run.score_date),
        previous_hist=checks.previous_score_histogram(settings, uc, run.score_date),
        drift=drift,
        checks=found_checks,
        realized=realized,
        decile_rates=realized[-1]["decile_rates"] if realized else None,
        uplift=uplift,
        context=context,
    )
    if attempt is None:  # a run outside the ledger: the date's file is its only one
        return written
    if attempt == newest_attempt:
        newest = report_site.night_file(settings, uc.name, run.score_date)
        part = newest.with_name(newest.name + ".part")
        shutil.copyfile(written, part)
        part.replace(newest)  # readers see the previous file or this one, never half of one
    return written


def _campaign_state(settings: Settings, uc: UseCase, night: date) -> dict[str, str] | None:
    """The report's sentences on the campaign as an experiment, as of ``night`` (None
    without a campaign)."""
    from pipeline.campaigns import experiment, monitor, policy

    pooled = monitor.campaign_experiment(settings, uc, matured_by=night)
    if uc.campaign is None or pooled is None:
        return None
    return {
        "pooled": pooled["text"],
        "plan": experiment.plan_text(experiment.plan_of(uc.campaign)),
        "policy": policy.policy_text(settings, uc),
    }


def _segment_scores(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    ledger_row: dict[str, Any] | None,
    published: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], str]:
    """Scores per value of each ``report.segments`` column, on a bounded sample of the night.

    The published scores of the date (a deterministic hash sample of at most
    ``REPORT_SAMPLE_ROWS`` entities, chosen in SQL) joined with the segment columns of the
    run's feature snapshot. Returns (rows, a note saying what was sampled or why nothing is shown).
    """
    import pyarrow.parquet as pq
    from psycopg2 import sql

    if not uc.report.segments:
        return [], "no segment columns configured (report.segments in the use case's config)"
    if published is None:
        return [], f"no scores of {run.score_date} are published: no segment view"
    sha = (ledger_row or {}).get("snapshot_sha256")
    snapshot = (
        settings.snapshots
        / uc.name
        / "features"
        / f"as_of={run.score_date}"
        / f"{str(sha)[:16]}.parquet"
    )
    if not sha or not snapshot.is_file():
        return [], "the night's feature snapshot is gone: no segment view"
    schema = pq.read_schema(snapshot)
    wanted = [c for c in uc.report.segments if c in schema.names]
    missing = [c for c in uc.report.segments if c not in schema.names]
    if not wanted:
        return [], f"segment columns {missing} are not features of the snapshot"
    stride = max(1, -(-int(published["rows"]) // REPORT_SAMPLE_ROWS))
    query = sql.SQL(
        "SELECT {key} AS key, {prob} AS probability, risk_decile FROM predictions.{table} "
        "WHERE score_date = %(d)s AND mod(abs(hashtext({key}::text)), %(stride)s) = 0"
    ).format(
        key=sql.Identifier(uc.entity_key),
        prob=sql.Identifier(uc.probability_column),
        table=sql.Identifier(uc.score_table),
    )
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, {"d": run.score_date, "stride": stride})
            scored = cur.fetchall()
        conn.commit()
    finally:
        conn.close()
    if not scored:
        return [], "no published scores in the sample"
    import numpy as np
    import pandas as pd

    scores = pd.DataFrame(scored, columns=["key", "probability", "risk_decile"])
    features_table = pq.read_table(snapshot, columns=[uc.entity_key, *wanted])
    frame = features_table.to_pandas().rename(columns={uc.entity_key: "key"})
    frame["key"] = frame["key"].astype(scores["key"].dtype, copy=False)
    joined = scores.merge(frame, on="key", how="inner")
    joined["top"] = (joined["risk_decile"] == 1).astype(np.float64)
    out: list[dict[str, Any]] = []
    for column in wanted:
        groups = joined.groupby(joined[column].astype("string").fillna("(missing)"), sort=False)
        table = groups.agg(
            rows=("probability", "size"), mean=("probability", "mean"), top=("top", "mean")
        ).sort_values("rows", ascending=False)
        for value, r in table.head(REPORT_SEGMENT_VALUES).iterrows():
            out.append(
                {
                    "segment": column,
                    "value": value,
                    "rows": int(r["rows"]),
                    "share": float(r["rows"]) / len(joined),
                    "mean": float(r["mean"]),
                    "top_decile_share": float(r["top"]),
                }
            )
    sampled = "all" if stride == 1 else f"a 1-in-{stride} hash sample of the"
    note = f"{sampled} {len(joined):,} published scores of {run.score_date}"
    if missing:
        note += f"; not features of the snapshot: {', '.join(missing)}"
    return out, note


def run_night(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    *,
    retrain: str | bool = "scheduled",
    run_id: str | None = None,
    promotion_mode: str = "auto",
    rescore_model: str | None = None,
    call: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """The whole night in-process, same stages as the DAG (CLI, tests and benchmarks).

    ``approval`` mode has no person to ask here: the challenger waits as the shadow model
    until ``nightscore models promote`` (the DAG asks in the Airflow UI instead). Each stage
    runs as ``call(stage_function, *args)``: by default shown on the command line; a
    benchmark passes its own to time them.
    """
    _shown = call or _show
    if isinstance(retrain, bool):
        retrain = "always" if retrain else "never"
    run = RunContext(uc.name, score_date, run_id or f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    params = {
        "retrain": retrain,
        "promotion_mode": promotion_mode,
        "rescore_model": rescore_model or "",
    }
    started = _shown(start_run, settings, uc, run, params)
    _shown(check_sources, settings, uc, run)
    snap = _shown(build_features, settings, uc, run)
    _shown(check_features, settings, uc, run, snap)
    evaluation = None
    if _shown(decide_retrain, settings, uc, run, retrain)["retrain"]:
        trained = _shown(train_challenger, settings, uc, run)
        evaluation = _shown(evaluate_challenger, settings, uc, run, trained, promotion_mode, snap)
    chosen = _shown(select_model, settings, uc, run, rescore_model, started["champion_at_start"])
    parts = _shown(score_partitions, settings, uc, run, snap, chosen["model_version"])
    _shown(check_scores, settings, uc, run, parts)
    published = _shown(publish_scores, settings, uc, run, snap, chosen["model_version"], parts)
    shadow = _shown(score_shadow, settings, uc, run, snap, chosen["model_version"], parts)
    written = _shown(write_report, settings, uc, run)
    return {
        "report": written["report"],
        "run": run.as_xcom(),
        "evaluation": evaluation,
        "model_version": chosen["model_version"],
        "published": published,
        "shadow": shadow,
    }


def _show(fn: Callable[..., Any], *args: Any) -> Any:
    """Call one stage of the night, shown on the command line under its own name."""
    if getattr(fn, "shows_progress", False):
        return fn(*args)
    with progress.stage(fn.__name__):
        return fn(*args)


def outcome_text(night: dict[str, Any], seconds: float) -> str:
    """One human paragraph about a night ``run_night`` returned: rows, model, time, report."""
    pub = night["published"]
    lines = [
        f"published {pub['rows']:,} rows for {night['run']['score_date']} with {night['model_version']} "
        f"in {progress.elapsed(seconds)}"
    ]
    ev = night.get("evaluation")
    if ev:
        lines.append(f"challenger {ev['version']}: {ev['decision']} ({'; '.join(ev['reasons'])})")
    if night["shadow"].get("shadow"):
        lines.append(f"shadow {night['shadow']['shadow']} scored beside it")
    lines.append(f"report: {night['report']}")
    return "\n".join(lines)
