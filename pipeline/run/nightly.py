"""The nightly run, stage by stage: one function per Airflow task, each recorded in the ledger.

Every function takes the settings, the use case and the run's identity, plus the small
metadata earlier stages returned (paths, versions, hashes), and returns small metadata.
The challenger's judgement and promotion are in ``pipeline.run.challenger``, the night's
report in ``pipeline.run.night_report``; ``stage`` finds any of them by task id. The DAG
wires them; ``run_night`` chains them in-process for the CLI and the tests.
"""

from __future__ import annotations

import logging
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
from pipeline.run import challenger, night_report
from pipeline.stages import (
    checks,
    evaluate,
    features,
    publish,
    score,
    source_days,
    source_scans,
    sources,
    train,
    windows,
)
from pipeline.store import db, ledger, registry, serving
from pipeline.store.ledger import RunContext

log = logging.getLogger(__name__)

RETRAIN_MODES = ("scheduled", "always", "never")


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
        earlier = source_scans.previous(settings, run)
        seen = sources.observe(
            settings.warehouse_url,
            settings.warehouse_schema,
            spec,
            run.score_date,
            uc.warehouse.timezone,
            uc.entity_key,
            history_days=lookback,
            session=uc.warehouse.settings,
            kept=earlier.kept,
            counts=earlier.counts,
        )
        results = seen.results
        if earlier.as_of is not None:
            results += source_days.rewritten_days(
                earlier.days,
                earlier.as_of,
                seen.days,
                settings.warehouse_schema,
                spec,
                since={t: run.score_date - timedelta(days=n) for t, n in lookback.items()},
            )
        source_scans.store(settings, run, seen.days, seen.kept, seen.counts)
        # per dated table, the first day its scan read: the run date of the night before
        # when the earlier days were proved unchanged (``source_scans``), else its lookback
        info["read_from"] = {t: str(k.read_from) for t, k in seen.kept.items()}
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
        for table, days in source_scans.run_days(settings, run).items()
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
    loaded: score.Loaded | None = None,
) -> dict[str, Any]:
    """Score one hash partition of the population (``loaded``: the model already read and
    its fast predictor built, by ``score_partitions`` for all of the process's partitions)."""
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
            loaded,
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
    allowance has cores (each takes its share of the OpenMP threads, as a mapped task does),
    all with the one model read and fast predictor built here."""
    n = uc.serving.partitions
    workers = max(1, min(n, train.cpu_allowance()))
    loaded = score.load(settings, uc, model_version)
    with (
        progress.stage("score_partitions", total=n, unit="partitions") as shown,
        ThreadPoolExecutor(workers, thread_name_prefix="score") as pool,
    ):
        futures = [
            pool.submit(score_partition, settings, uc, run, snapshot, model_version, p, loaded)
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


def stage(name: str) -> Callable[..., Any]:
    """The function of the nightly task ``name`` (a task's id is its function's name).

    Raises:
        KeyError: no stage of the night has that name.
    """
    stages = {
        fn.__name__: fn
        for fn in (
            start_run,
            check_sources,
            check_features,
            check_scores,
            build_features,
            decide_retrain,
            train_challenger,
            challenger.evaluate_challenger,
            challenger.promote_challenger,
            challenger.record_review,
            select_model,
            score_partition,
            publish_scores,
            score_shadow,
            night_report.write_report,
        )
    }
    return stages[name]


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
        evaluation = _shown(
            challenger.evaluate_challenger, settings, uc, run, trained, promotion_mode, snap
        )
    chosen = _shown(select_model, settings, uc, run, rescore_model, started["champion_at_start"])
    parts = _shown(score_partitions, settings, uc, run, snap, chosen["model_version"])
    _shown(check_scores, settings, uc, run, parts)
    published = _shown(publish_scores, settings, uc, run, snap, chosen["model_version"], parts)
    shadow = _shown(score_shadow, settings, uc, run, snap, chosen["model_version"], parts)
    written = _shown(night_report.write_report, settings, uc, run)
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
