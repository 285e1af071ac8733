"""The run ledger (``ml.runs``): what each run did, with which model, data and code.

One row per (use case, score date, run id). Each stage merges its status, seconds and
counts into the ``stages`` JSON, so a summary or a post-mortem reads one row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.conf.config import Settings
from pipeline.core.paths import REPO_ROOT
from pipeline.store import db, locks

if TYPE_CHECKING:
    from pipeline.conf.usecase import UseCase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Identity of one run: what it scores and under which id it is recorded."""

    use_case: str
    score_date: date
    run_id: str

    def as_xcom(self) -> dict[str, str]:
        return {
            "use_case": self.use_case,
            "score_date": self.score_date.isoformat(),
            "run_id": self.run_id,
        }


ENV_CODE_VERSION = "NIGHTSCORE_CODE_VERSION"
ENV_DAGS_FOLDER = "AIRFLOW__CORE__DAGS_FOLDER"


def product_folders() -> tuple[Path, ...]:
    """The folders whose ``.py`` and ``.sql`` files make the code version, as found at run
    time: ``pipeline/`` and ``sql/`` of the installed package, and the DAG folder Airflow
    reads (``$AIRFLOW__CORE__DAGS_FOLDER``, else ``<repository>/dags``). In docker-compose.yml
    the DAGs are mounted apart from the package, so the repository's ``dags/`` may not exist.
    """
    dags = os.environ.get(ENV_DAGS_FOLDER)
    return (
        REPO_ROOT / "pipeline",
        REPO_ROOT / "sql",
        Path(dags).resolve() if dags else REPO_ROOT / "dags",
    )


def _product_digest(folders: tuple[Path, ...]) -> bytes:
    files = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".sql") and path.is_file():
                stat = path.stat()
                name = f"{folder.name}/{path.relative_to(folder)}"
                files.append((name, str(path), stat.st_mtime_ns, stat.st_size))
    # Reading stats is cheap; the contents are hashed again only when one of them moved.
    return _digest_files(tuple(files))


@lru_cache(maxsize=8)
def _digest_files(files: tuple[tuple[str, str, int, int], ...]) -> bytes:
    digest = hashlib.sha256()
    for name, path, _, _ in files:
        digest.update(name.encode())
        digest.update(Path(path).read_bytes())
    return digest.digest()


def code_version(uc: UseCase | None = None) -> str:
    """The version of the code that computes predictions.

    ``$NIGHTSCORE_CODE_VERSION`` when set (a deployment that knows its release, e.g. a git
    commit covering the use cases too), else a content hash of ``product_folders()`` and,
    for a use case, of every file of its folder it names (config, SQL, contract), read from
    where they are loaded (a mounted ``usecases/`` included).
    """
    configured = os.environ.get(ENV_CODE_VERSION, "").strip()
    if configured:
        return configured
    digest = hashlib.sha256(_product_digest(product_folders()))
    for path in sorted(uc.files()) if uc is not None else []:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def start(
    settings: Settings,
    run: RunContext,
    params: dict[str, Any] | None = None,
    code: str | None = None,
) -> int:
    """Create (or reset, on a retry of the same run) the ledger row; returns its attempt number.

    Attempts count the runs of one (use case, score date): the first run is attempt 1, a
    re-run or backfill of the date is attempt 2, and so on. Every other attempt of the use
    case still ``running`` (of any date) whose process is gone is marked ``abandoned``.
    Starts of one use case are serialized by its ledger lock (``ml.locks``, writer-only).

    Raises:
        LockTimeout: another session held the use case's ledger lock past the lock timeout.
    """
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            locks.lock(
                cur,
                f"ledger.{run.use_case}",
                what=f"start of {run.use_case} run {run.run_id} for {run.score_date}",
            )
            _abandon_dead_attempts(cur, run)
            cur.execute(
                """
                INSERT INTO ml.runs (use_case, score_date, run_id, code_version, params, attempt)
                SELECT %(uc)s, %(d)s, %(run)s, %(code)s, %(params)s,
                       coalesce(max(attempt), 0) + 1
                FROM ml.runs WHERE use_case = %(uc)s AND score_date = %(d)s
                ON CONFLICT (use_case, score_date, run_id) DO UPDATE
                SET status = 'running', error = NULL, started_at = now(), finished_at = NULL,
                    stages = '{}', code_version = EXCLUDED.code_version, params = EXCLUDED.params
                RETURNING attempt
                """,
                {
                    "uc": run.use_case,
                    "d": run.score_date,
                    "run": run.run_id,
                    "code": code or code_version(),
                    "params": json.dumps(params or {}, default=str),
                },
            )
            attempt = int(cur.fetchone()[0])
        conn.commit()
    finally:
        conn.close()
    return attempt


_LEDGER_ROW = "use_case = %s AND score_date = %s AND run_id = %s"


def _abandon_dead_attempts(cur: Any, run: RunContext) -> list[tuple[date, str]]:
    """Mark 'abandoned' the other attempts of the use case, of any date, still 'running'
    with no live process; returns their (score date, run id).

    A process working on a stage of a run holds ``FOR KEY SHARE`` on the run's ledger row
    (see :func:`stage`), which a killed process's connection releases. ``FOR UPDATE SKIP
    LOCKED`` therefore returns exactly the attempts no process works on. Only the writer
    can lock ``ml.runs`` rows: a reader can neither fake a dead attempt's liveness nor
    block a live one's. An attempt between two Airflow tasks holds nothing and counts as
    gone; its next stage or the publish sets its status again.
    """
    cur.execute(
        """
        UPDATE ml.runs r
        SET status = 'abandoned', finished_at = now(),
            error = coalesce(r.error || '; ', '') || %(why)s
        FROM (SELECT score_date, run_id FROM ml.runs
              WHERE use_case = %(uc)s AND status = 'running'
                AND (score_date, run_id) <> (%(d)s, %(run)s)
              FOR UPDATE SKIP LOCKED) dead
        WHERE r.use_case = %(uc)s AND r.score_date = dead.score_date AND r.run_id = dead.run_id
        RETURNING r.score_date, r.run_id
        """,
        {
            "why": f"abandoned: its process was gone when {run.run_id} ({run.score_date}) started",
            "uc": run.use_case,
            "d": run.score_date,
            "run": run.run_id,
        },
    )
    dead = sorted((row[0], row[1]) for row in cur.fetchall())
    if dead:
        log.warning(
            "%s: attempts %s abandoned (their process was gone) as run %s of %s started",
            run.use_case,
            [f"{day} {run_id}" for day, run_id in dead],
            run.run_id,
            run.score_date,
        )
    return dead


@contextmanager
def _alive(settings: Settings, run: RunContext) -> Iterator[None]:
    """Hold the run's liveness mark: ``FOR KEY SHARE`` on its ledger row, from a connection
    of its own (shared: parallel tasks of one run hold it together).

    A run marked 'abandoned' while none of its processes worked (between two Airflow tasks,
    or before a task's retry) is 'running' again once one does.
    """
    row = (run.use_case, run.score_date, run.run_id)
    with locks.held(
        settings.database_url,
        "ml.runs",
        _LEDGER_ROW,
        row,
        what=f"liveness mark of {run.use_case} run {run.run_id} ({run.score_date})",
    ):
        db_exec(
            settings,
            f"UPDATE ml.runs SET status = 'running', finished_at = NULL "
            f"WHERE {_LEDGER_ROW} AND status = 'abandoned'",
            row,
        )
        yield


def update(settings: Settings, run: RunContext, **fields: Any) -> None:
    """Set plain columns of the run's ledger row (model_version, snapshot_sha256, ...)."""
    allowed = {
        "model_version",
        "snapshot_sha256",
        "source_counts",
        "status",
        "error",
        "rows_published",
    }
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown ledger fields {sorted(unknown)}")
    sets = ", ".join(f"{k} = %s" for k in fields)
    values = [json.dumps(v) if isinstance(v, dict) else v for v in fields.values()]
    if fields.get("status") in ("published", "failed", "stopped", "dry_run", "abandoned"):
        sets += ", finished_at = now()"
    db_exec(
        settings,
        f"UPDATE ml.runs SET {sets} WHERE use_case = %s AND score_date = %s AND run_id = %s",
        (*values, run.use_case, run.score_date, run.run_id),
    )


def record_stage(settings: Settings, run: RunContext, stage: str, info: dict[str, Any]) -> None:
    db_exec(
        settings,
        """
        UPDATE ml.runs SET stages = stages || jsonb_build_object(%s::text, %s::jsonb)
        WHERE use_case = %s AND score_date = %s AND run_id = %s
        """,
        (stage, json.dumps(info, default=str), run.use_case, run.score_date, run.run_id),
    )


@contextmanager
def stage(settings: Settings, run: RunContext, name: str) -> Iterator[dict[str, Any]]:
    """Time a stage and record it; the body may add counts to the yielded dict.

    A failing stage is recorded as failed with its error, then the error propagates. While
    the body runs, the process holds the run's liveness mark, so a later run of the use
    case can tell a dead attempt (marked 'abandoned') from a live one.
    """
    info: dict[str, Any] = {}
    began = time.monotonic()
    try:
        with _alive(settings, run):
            yield info
    except BaseException as exc:
        info |= {
            "status": "failed",
            "seconds": round(time.monotonic() - began, 3),
            "error": str(exc)[:2000],
        }
        try:
            record_stage(settings, run, name, info)
            update(settings, run, status="failed", error=f"{name}: {exc}"[:2000])
        except Exception:  # the ledger must never hide the original error
            log.exception("could not record failure of %s in the ledger", name)
        raise
    info |= {"status": "ok", "seconds": round(time.monotonic() - began, 3)}
    record_stage(settings, run, name, info)
    log.info("%s %s %s: %s", run.use_case, run.score_date, name, info)


def db_exec(settings: Settings, query: str, params: tuple[Any, ...]) -> None:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
        conn.commit()
    finally:
        conn.close()


def runs(settings: Settings, use_case: str, since: date | None = None) -> list[dict[str, Any]]:
    """Ledger rows, oldest first, as dicts (for summaries and reports)."""
    return db.records(
        settings.database_url,
        """
        SELECT r.score_date, r.run_id, r.status, r.model_version, r.rows_published,
               r.stages, r.snapshot_sha256, r.code_version, r.error,
               (m.metrics ->> 'roc_auc')::float8 AS model_auc
        FROM ml.runs r
        LEFT JOIN ml.model_versions m
               ON m.use_case = r.use_case AND m.version = r.model_version
        WHERE r.use_case = %s AND (%s::date IS NULL OR r.score_date >= %s::date)
        ORDER BY r.score_date, r.started_at
        """,
        (use_case, since, since),
    )


# The stages a night records, in the order it runs them (score_partition_<n>: one per partition).
NIGHT_STAGES = (
    "start_run",
    "check_sources",
    "build_features",
    "check_features",
    "decide_retrain",
    "train_challenger",
    "evaluate_challenger",
    "promote_challenger",
    "record_review",
    "select_model",
    "score_partition",
    "check_scores",
    "publish_scores",
    "score_shadow",
    "write_report",
)

SUMMARY_STAGES = (
    "build_features",
    "train_challenger",
    "evaluate_challenger",
    "select_model",
    "score",
    "publish_scores",
    "score_shadow",
)


def summary_text(settings: Settings, uc: UseCase, since: date | None) -> str:
    """Per night: model version, its out-of-time AUC, rows published, seconds per stage."""
    rows = runs(settings, uc.name, since)
    head = (
        f"{'score_date':10}  {'status':9}  {'model_version':25} {'AUC':>6}  {'rows':>8}  "
        + "  ".join(f"{s[:9]:>9}" for s in SUMMARY_STAGES)
    )
    lines = ["per night (seconds per stage):", head]
    for r in rows:
        stages = r["stages"] or {}
        secs = []
        for s in SUMMARY_STAGES:
            if s == "score":
                parts = [
                    v["seconds"] for k, v in stages.items() if k.startswith("score_partition_")
                ]
                secs.append(sum(parts) if parts else None)
            else:
                secs.append(stages.get(s, {}).get("seconds"))
        cells = "  ".join(f"{x:9.2f}" if x is not None else f"{'-':>9}" for x in secs)
        auc = f"{r['model_auc']:.3f}" if r["model_auc"] is not None else "-"
        published = r["rows_published"] or 0
        lines.append(
            f"{r['score_date']!s:10}  {r['status']:9}  {r['model_version'] or '-':25} {auc:>6}  {published:>8,}  {cells}"
        )
        ev = stages.get("evaluate_challenger", {})
        if ev.get("decision"):
            lines.append(
                f"{'':12}challenger {stages['train_challenger'].get('version')}: {ev['decision']}"
                f" ({'; '.join(ev.get('reasons', []))})"
            )
            lines.append(f"{'':12}evaluation report: {ev.get('report')}")
        pub = stages.get("publish_scores", {})
        if pub.get("rows_per_second"):
            lines.append(
                f"{'':12}published {pub['rows']:,} rows at {pub['rows_per_second']:,} rows/s"
            )
        sh = stages.get("score_shadow", {})
        if sh.get("shadow"):
            lines.append(
                f"{'':12}shadow {sh['shadow']}: spearman {sh['spearman']:.3f}, top-decile overlap "
                f"{sh['top_decile_overlap']:.2f}, audience +{sh['audience_enter']:.0f}/-{sh['audience_leave']:.0f}"
            )
    lines += [
        "",
        "read the predictions:",
        f'  psql "$(.venv/bin/nightscore db url)" -c "SELECT {uc.entity_key}, {uc.probability_column}, '
        f"risk_decile, model_version FROM predictions.{uc.score_table}_latest "
        f'ORDER BY {uc.probability_column} DESC LIMIT 10"',
    ]
    return "\n".join(lines)
