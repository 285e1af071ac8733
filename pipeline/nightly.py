"""The nightly run, stage by stage: one function per Airflow task, each recorded in the ledger.

Every function takes the settings, the use case and the run's identity, plus the small
metadata earlier stages returned (paths, versions, hashes), and returns small metadata.
The DAG wires them; ``run_night`` chains them in-process for the CLI and the tests.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from typing import Any

from pipeline import db, evaluate, features, ledger, publish, registry, score, train
from pipeline.config import Settings, UseCase
from pipeline.errors import GateFailed, ModelError
from pipeline.ledger import RunContext

log = logging.getLogger(__name__)

PROMOTION_MODES = ("auto", "never")


def start_run(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Open the run's ledger row."""
    ledger.start(settings, run)
    log.info(
        "run %s started for %s as of %s (code %s)",
        run.run_id,
        uc.name,
        run.score_date,
        ledger.code_version(),
    )
    return run.as_xcom()


def build_features(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Snapshot the features of the population as of the score date."""
    with ledger.stage(settings, run, "build_features") as info:
        counts = db.read_arrow(
            settings.warehouse_url,
            db.sql_text("features", uc.source_counts_sql),
            {"as_of": run.score_date},
            schema=settings.warehouse_schema,
        ).to_pylist()
        snap = features.build_snapshot(settings, uc, run.score_date)
        info |= {"rows": snap.rows, "sha256": snap.sha256}
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


def train_challenger(settings: Settings, uc: UseCase, run: RunContext) -> dict[str, Any]:
    """Train a challenger on matured snapshots; out-of-time metrics on the holdout."""
    with ledger.stage(settings, run, "train_challenger") as info:
        trained = train.train_challenger(settings, uc, run.score_date, ledger.code_version())
        info |= {"version": trained.version, "roc_auc": trained.metrics["roc_auc"]}
    return trained.as_xcom()


def evaluate_challenger(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    trained: dict[str, Any],
    promotion_mode: str = "auto",
) -> dict[str, Any]:
    """Compare the challenger with the champion on the same holdout; promote on pass.

    Gates: the challenger's holdout AUC must reach the floor, and must not be worse than
    the champion's on the same holdout by more than the non-inferiority margin.
    """
    if promotion_mode not in PROMOTION_MODES:
        raise GateFailed(
            f"promotion_mode must be one of {PROMOTION_MODES}, found {promotion_mode!r}"
        )
    with ledger.stage(settings, run, "evaluate_challenger") as info:
        holdout = features.Snapshot.from_xcom(trained["holdout"])
        table = features.read_snapshot(holdout)
        y = table.column("label").to_numpy()
        challenger, mv = registry.load_model(settings, uc.name, trained["version"])
        cols = [f["name"] for f in mv.feature_schema]
        ch_metrics = evaluate.classification_metrics(y, train.predict(challenger, table, cols))
        champ = registry.champion(settings, uc.name)
        champ_metrics = None
        reasons = []
        if ch_metrics["roc_auc"] < uc.auc_floor:
            reasons.append(f"AUC {ch_metrics['roc_auc']:.4f} below floor {uc.auc_floor:.2f}")
        if champ is not None:
            champ_model, champ_mv = registry.load_model(settings, uc.name, champ.version)
            champ_cols = [f["name"] for f in champ_mv.feature_schema]
            champ_metrics = evaluate.classification_metrics(
                y, train.predict(champ_model, table, champ_cols)
            )
            delta = ch_metrics["roc_auc"] - champ_metrics["roc_auc"]
            if delta < -uc.noninferiority_margin:
                reasons.append(
                    f"AUC {ch_metrics['roc_auc']:.4f} worse than champion {champ.version} "
                    f"({champ_metrics['roc_auc']:.4f}) by {-delta:.4f} > margin {uc.noninferiority_margin}"
                )
        passed = not reasons
        decision = (
            "promote" if passed and promotion_mode == "auto" else ("shadow" if passed else "reject")
        )
        if passed:
            reasons.append(
                "passed: AUC floor" + (" and non-inferiority vs champion" if champ else "")
            )
        _record_evaluation(
            settings,
            uc,
            run,
            trained,
            champ.version if champ else None,
            holdout,
            ch_metrics,
            champ_metrics,
            decision,
            reasons,
        )
        if decision == "promote":
            registry.promote(
                settings,
                uc.name,
                trained["version"],
                actor=f"nightly:{run.run_id}",
                reason="; ".join(reasons),
                effective_date=run.score_date,
            )
        info |= {
            "decision": decision,
            "reasons": reasons,
            "challenger_auc": ch_metrics["roc_auc"],
            "champion_auc": champ_metrics["roc_auc"] if champ_metrics else None,
        }
        log.info("evaluation of %s: %s (%s)", trained["version"], decision, "; ".join(reasons))
    return {"version": trained["version"], "decision": decision, "reasons": reasons}


def _record_evaluation(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    trained: dict[str, Any],
    champion: str | None,
    holdout: features.Snapshot,
    ch: dict[str, float],
    champ: dict[str, float] | None,
    decision: str,
    reasons: list[str],
) -> None:
    import json

    ledger.db_exec(
        settings,
        """
        INSERT INTO ml.evaluations (use_case, challenger, champion, holdout_as_of, holdout_sha256,
            metrics, decision, reasons, run_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            uc.name,
            trained["version"],
            champion,
            holdout.as_of,
            holdout.sha256,
            json.dumps({"challenger": ch, "champion": champ}),
            decision,
            json.dumps(reasons),
            run.run_id,
        ),
    )


def select_model(
    settings: Settings, uc: UseCase, run: RunContext, rescore_model: str | None = None
) -> dict[str, Any]:
    """Pin the one model this run scores with (the champion now, or an explicit version).

    Every partition uses exactly this version; a promotion during the run changes nothing.
    """
    with ledger.stage(settings, run, "select_model") as info:
        if rescore_model:
            mv = registry.get(settings, uc.name, rescore_model)
        else:
            champ = registry.champion(settings, uc.name)
            if champ is None:
                raise ModelError(
                    f"no champion model for use case {uc.name!r}: run with retrain=true so a "
                    "challenger can pass the gates, or promote a version with `nightscore models promote`"
                )
            mv = champ
        ledger.update(settings, run, model_version=mv.version)
        info |= {"model_version": mv.version}
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
        part = score.score_partition(
            settings,
            uc,
            features.Snapshot.from_xcom(snapshot),
            model_version,
            partition,
            uc.score_partitions,
            run.run_id,
        )
        info |= {"rows": part.rows}
    return part.as_xcom()


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
        if found != expected or len(scored) != uc.score_partitions:
            raise GateFailed(
                f"scored {found} rows in {len(scored)} partitions, expected {expected} rows in "
                f"{uc.score_partitions}: a partition is missing or incomplete; nothing was published"
            )
        if dry_run:
            ledger.update(settings, run, status="dry_run")
            info |= {"rows": found, "dry_run": True}
            return {"rows": found, "dry_run": True}
        result = publish.publish_scores(settings, uc, run, model_version, scored, expected)
        info |= result.as_xcom()
    return result.as_xcom()


def run_night(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    *,
    retrain: bool = True,
    run_id: str | None = None,
    promotion_mode: str = "auto",
) -> dict[str, Any]:
    """The whole night in-process, same stages as the DAG (CLI and tests)."""
    run = RunContext(uc.name, score_date, run_id or f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S%f}")
    start_run(settings, uc, run)
    snap = build_features(settings, uc, run)
    evaluation = None
    if retrain:
        trained = train_challenger(settings, uc, run)
        evaluation = evaluate_challenger(settings, uc, run, trained, promotion_mode)
    chosen = select_model(settings, uc, run)
    parts = [
        score_partition(settings, uc, run, snap, chosen["model_version"], p)
        for p in range(uc.score_partitions)
    ]
    published = publish_scores(settings, uc, run, snap, chosen["model_version"], parts)
    return {
        "run": run.as_xcom(),
        "evaluation": evaluation,
        "model_version": chosen["model_version"],
        "published": published,
    }
