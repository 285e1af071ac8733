"""Model registry in PostgreSQL (``ml`` schema) and the artifact store on disk.

A model version is a pickled scikit-learn Pipeline plus a JSON card. The registry keeps
the artifact's sha256; ``load_model`` checks it before unpickling, so a tampered or
missing artifact is refused and nothing unverified is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.conf.config import Settings
from pipeline.core.errors import ModelError
from pipeline.store import db, locks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    use_case: str
    version: str
    trained_as_of: date
    artifact_uri: str
    sha256: str
    status: str
    metrics: dict[str, Any]
    feature_schema: list[dict[str, str]]
    training_window: dict[str, Any]
    library_versions: dict[str, str]
    card_sha256: str | None = None


_COLUMNS = (
    "use_case, version, trained_as_of, artifact_uri, sha256, status, metrics, "
    "feature_schema, training_window, library_versions, card_sha256"
)


def _row_to_version(row: tuple[Any, ...]) -> ModelVersion:
    return ModelVersion(*row)


def _fetch_one(settings: Settings, where: str, params: tuple[Any, ...]) -> ModelVersion | None:
    """The newest model version matching ``where`` (a fixed SQL condition), or None."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM ml.model_versions WHERE {where} ORDER BY created_at DESC LIMIT 1",
                params,
            )
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else _row_to_version(row)


def register(settings: Settings, card: dict[str, Any], card_sha256: str) -> ModelVersion:
    """Record a trained model as a ``candidate``. Re-registering the same version is a no-op.

    ``card_sha256`` is the sha256 of the card file (``model.json``), checked whenever the
    card is read, as the artifact's is.
    """
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO ml.model_versions (use_case, version, trained_as_of, training_window,
                    feature_schema, artifact_uri, sha256, library_versions, metrics, card_sha256)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (use_case, version) DO NOTHING
                """,
                (
                    card["use_case"],
                    card["version"],
                    card["trained_as_of"],
                    json.dumps(card["training_window"]),
                    json.dumps(card["features"]),
                    card["artifact_uri"],
                    card["sha256"],
                    json.dumps(card["library_versions"]),
                    json.dumps(card["metrics"]),
                    card_sha256,
                ),
            )
        conn.commit()
    finally:
        conn.close()
    return get(settings, card["use_case"], card["version"])


def get(settings: Settings, use_case: str, version: str) -> ModelVersion:
    mv = _fetch_one(settings, "use_case = %s AND version = %s", (use_case, version))
    if mv is None:
        raise ModelError(
            f"model version {version!r} of use case {use_case!r} is not in ml.model_versions; "
            "list versions with `nightscore models list`"
        )
    return mv


def with_sha256(settings: Settings, use_case: str, sha256: str) -> ModelVersion | None:
    """The registered version whose artifact has these bytes (the first registered), if any."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM ml.model_versions WHERE use_case = %s AND sha256 = %s "
                "ORDER BY created_at, version LIMIT 1",
                (use_case, sha256),
            )
            row = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    return None if row is None else _row_to_version(row)


def list_versions(settings: Settings, use_case: str) -> list[ModelVersion]:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM ml.model_versions WHERE use_case = %s ORDER BY created_at, version",
                (use_case,),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    return [_row_to_version(r) for r in rows]


def champion(settings: Settings, use_case: str) -> ModelVersion | None:
    """The current champion, or None before the first promotion."""
    return _fetch_one(settings, "use_case = %s AND status = 'champion'", (use_case,))


def promote(
    settings: Settings,
    use_case: str,
    version: str,
    *,
    actor: str,
    reason: str,
    effective_date: date,
    action: str = "promote",
    run_id: str | None = None,
) -> str | None:
    """Make ``version`` the champion; the previous champion is retired. Logged, atomic.

    The promotion takes effect on ``effective_date`` or, if the log already holds a later
    one, on that later date: effective dates never go back, so the champion the registry
    names is the one ``champion_on`` gives for every date from the newest effective date
    on (approving a past-dated run's challenger cannot make them disagree).

    Returns:
        the previous champion's version, if any.
    """

    def promotion(previous: str | None) -> tuple[str, tuple[Any, ...]]:
        return (
            "INSERT INTO ml.promotions (use_case, action, version, previous_version, "
            "effective_date, actor, reason, run_id) VALUES (%s, %s, %s, %s, GREATEST(%s::date, "
            "(SELECT max(effective_date) FROM ml.promotions WHERE use_case = %s)), %s, %s, %s)",
            (use_case, action, version, previous, effective_date, use_case, actor, reason, run_id),
        )

    previous = swap_champion(
        settings, "ml.model_versions", use_case, version, promotion, what="version"
    )
    log.info("%s: %s %s (was %s): %s", use_case, action, version, previous, reason)
    return previous


def _registry_lock(cur: Any, use_case: str, what: str) -> None:
    """Serialize the use case's registry changes (champions of models and policies, the
    shadow model) until the transaction ends, under its writer-only lock (``ml.locks``).

    Raises:
        LockTimeout: another session held the lock past the lock timeout; the transaction
            was rolled back and nothing changed.
    """
    locks.lock(cur, f"registry.{use_case}", what=f"{what} of {use_case}")


def swap_champion(
    settings: Settings,
    table: str,
    use_case: str,
    version: str,
    log_row: Callable[[str | None], tuple[str, tuple[Any, ...]]],
    *,
    what: str,
) -> str | None:
    """Make ``version`` the champion in ``table`` (``ml.model_versions`` or ``ml.policies``),
    retire the previous one and write ``log_row(previous)`` (an INSERT and its parameters)
    in one transaction under the use case's lock. Returns the previous champion; nothing
    changes when ``version`` already is it.

    Raises:
        ModelError: ``version`` is not in ``table``.
        LockTimeout: another session held the use case's registry lock past the lock timeout.
    """
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            _registry_lock(cur, use_case, f"champion change in {table}")
            cur.execute(
                f"SELECT version FROM {table} WHERE use_case = %s AND status = 'champion' "
                "FOR UPDATE",
                (use_case,),
            )
            row = cur.fetchone()
            previous = row[0] if row else None
            if previous == version:
                conn.rollback()
                return previous
            cur.execute(
                f"UPDATE {table} SET status = 'retired' WHERE use_case = %s AND status = 'champion'",
                (use_case,),
            )
            cur.execute(
                f"UPDATE {table} SET status = 'champion' WHERE use_case = %s AND version = %s",
                (use_case, version),
            )
            if cur.rowcount != 1:
                raise ModelError(f"cannot promote unknown {what} {version!r} of {use_case!r}")
            cur.execute(*log_row(previous))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()
    return previous


_RESTORE_STORE = "restore the artifact store or promote/roll back to another version"


def verified(path: Path, expected: str, what: str, fix: str, missing_fix: str) -> bytes:
    """The bytes of ``path`` if their sha256 is the one the registry holds.

    Raises:
        ModelError: the file is missing (``missing_fix`` says what to do), or was modified
            or replaced since it was registered (``fix``).
    """
    if not path.is_file():
        raise ModelError(f"the {what} is missing at {path}; {missing_fix}")
    raw = path.read_bytes()
    found = hashlib.sha256(raw).hexdigest()
    if found != expected:
        raise ModelError(
            f"the {what} at {path} has sha256 {found}, but the registry expects {expected}; "
            f"the file was modified or replaced; refusing to read it ({fix})"
        )
    return raw


# Where each module of the package lived before it was laid out in layers: an artifact
# pickled then (an uplift policy names its model's class, ``pipeline.uplift.EffectModel``)
# still loads. Artifacts keep their bytes, so their sha256 and version stay what they were.
FORMER_MODULES = {
    f"pipeline.{name}": f"pipeline.{layer}.{name}"
    for layer, names in {
        "core": "errors faults figures files keys progress",
        "conf": "config contract embedded usecase",
        "store": "db ledger locks registry serving turns",
        "stages": "checks evaluate features forest forest_kernel publish score sources train windows",
        "campaigns": "campaign experiment monitor policy uplift",
        "reports": "report_app report_site run_pages run_status",
        "run": "alerts nightly",
        "faces": "airflow_env cli preflight",
        "synthetic": "demo populations warehouse",
    }.items()
    for name in names.split()
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(FORMER_MODULES.get(module, module), name)


def unpickle(raw: bytes) -> Any:
    """The object pickled in ``raw`` (a verified artifact), classes of the package's
    former flat modules (``FORMER_MODULES``) found where they live now."""
    return _Unpickler(io.BytesIO(raw)).load()


def load_model(settings: Settings, use_case: str, version: str) -> tuple[Any, ModelVersion]:
    """Load a registered model after checking its artifact's sha256 against the registry.

    Raises:
        ModelError: unknown version, missing artifact, or a hash mismatch (tampering).
    """
    mv = get(settings, use_case, version)
    path = Path(mv.artifact_uri)
    raw = verified(
        path,
        mv.sha256,
        f"artifact of {use_case} model {version}",
        "restore the original artifact or retrain",
        _RESTORE_STORE,
    )
    return unpickle(raw), mv


def rollback(
    settings: Settings, use_case: str, *, actor: str, reason: str, effective_date: date
) -> str:
    """Make the previous champion the champion again (no retraining). Logged.

    Returns:
        the restored version.

    Raises:
        ModelError: there is no earlier champion to return to.
    """
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT version, previous_version FROM ml.promotions
                WHERE use_case = %s ORDER BY promotion_id DESC LIMIT 1
                """,
                (use_case,),
            )
            row = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    if row is None or row[1] is None:
        raise ModelError(
            f"cannot roll back {use_case}: the promotions log has no earlier champion to restore "
            "(promote a version explicitly with `nightscore models promote VERSION --reason ...`)"
        )
    promote(
        settings,
        use_case,
        row[1],
        actor=actor,
        reason=reason,
        effective_date=effective_date,
        action="rollback",
    )
    return str(row[1])


def next_night(settings: Settings, use_case: str, today: date) -> date:
    """The score date of the first night a promotion made now would serve: the night after
    the newest run of the use case, and not before ``today``. Promotions in a run are
    stamped with the run's score date, so ``champion_on`` and the registry agree however
    promotions were made."""
    newest = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.runs WHERE use_case = %s",
        (use_case,),
    )
    return max(today, db.to_date(newest) + timedelta(days=1)) if newest else today


def champion_since(settings: Settings, use_case: str) -> date | None:
    """The effective date of the newest promotion or rollback (the champion's first night)."""
    value = db.scalar(
        settings.database_url,
        "SELECT effective_date FROM ml.promotions WHERE use_case = %s "
        "ORDER BY promotion_id DESC LIMIT 1",
        (use_case,),
    )
    return None if value is None else db.to_date(value)


def champion_on(settings: Settings, use_case: str, day: date) -> str | None:
    """The champion in force for score date ``day``, answered from the promotions log."""
    value = db.scalar(
        settings.database_url,
        """
        SELECT version FROM ml.promotions
        WHERE use_case = %s AND effective_date <= %s
        ORDER BY effective_date DESC, promotion_id DESC LIMIT 1
        """,
        (use_case, day),
    )
    return None if value is None else str(value)


def shadow(settings: Settings, use_case: str) -> ModelVersion | None:
    """The current shadow model (the newest challenger that was not promoted), if any."""
    return _fetch_one(settings, "use_case = %s AND status = 'shadow'", (use_case,))


def set_shadow(settings: Settings, use_case: str, version: str) -> None:
    """Make ``version`` (tonight's challenger, new or an earlier model trained again) the one
    shadow model; the previous shadow is retired. The champion never becomes the shadow."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            _registry_lock(cur, use_case, f"shadow change to {version}")
            cur.execute(
                "SELECT status FROM ml.model_versions WHERE use_case = %s AND version = %s",
                (use_case, version),
            )
            row = cur.fetchone()
            if row is None or row[0] == "champion":
                conn.rollback()  # the champion is served, not shadowed
                return
            cur.execute(
                "UPDATE ml.model_versions SET status = 'retired' "
                "WHERE use_case = %s AND status = 'shadow' AND version <> %s",
                (use_case, version),
            )
            cur.execute(
                "UPDATE ml.model_versions SET status = 'shadow' "
                "WHERE use_case = %s AND version = %s AND status <> 'champion'",
                (use_case, version),
            )
        conn.commit()
    finally:
        conn.close()


@dataclass(frozen=True)
class Review:
    """A person's answer to an approval request (or the default a timeout gave)."""

    approved: bool
    by: str | None  # None: nobody answered before the timeout
    at: datetime

    @classmethod
    def from_hitl(cls, answer: dict[str, Any]) -> Review:
        """From the Airflow approval's response: chosen option, responder, response time."""
        who = answer.get("responded_by_user") or {}
        at = answer.get("responded_at")
        return cls(
            approved="Approve" in (answer.get("chosen_options") or []),
            by=who.get("name") or who.get("id") or None,
            at=datetime.fromisoformat(at) if isinstance(at, str) else (at or datetime.now(UTC)),
        )

    @property
    def decision(self) -> str:
        return "approved" if self.approved else "rejected"

    def text(self, version: str, outcome: str) -> str:
        """``Rejected by admin at 2026-12-06 09:04 UTC; <version> kept as shadow``."""
        who = f"by {self.by}" if self.by else "by nobody (the approval timed out)"
        return f"{self.decision.capitalize()} {who} at {self.at.astimezone(UTC):%Y-%m-%d %H:%M} UTC; {version} {outcome}"


def record_review(
    settings: Settings, table: str, use_case: str, version: str, run_id: str | None, review: Review
) -> int:
    """Write a person's decision on ``version`` into the evaluation record that awaited it
    (``ml.evaluations`` for models, ``ml.policies`` for policies): decision, who, when.
    Returns the rows updated (0 when nothing awaited approval)."""
    column = "challenger" if table == "ml.evaluations" else "version"
    return int(
        db.scalar(
            settings.database_url,
            f"WITH done AS (UPDATE {table} SET decision = %s, reviewed_by = %s, reviewed_at = %s "
            f"WHERE use_case = %s AND {column} = %s AND decision = 'awaiting_approval' "
            "AND (%s::text IS NULL OR run_id = %s) RETURNING 1) SELECT count(*) FROM done",
            (review.decision, review.by, review.at, use_case, version, run_id, run_id),
        )
        or 0
    )


def promoted_by_run(settings: Settings, use_case: str, run_id: str) -> str | None:
    """The version a given run promoted (its own challenger, approved or automatic)."""
    value = db.scalar(
        settings.database_url,
        "SELECT version FROM ml.promotions WHERE use_case = %s AND run_id = %s AND action = 'promote' "
        "ORDER BY promotion_id DESC LIMIT 1",
        (use_case, run_id),
    )
    return None if value is None else str(value)


def request_retrain(settings: Settings, use_case: str, reason: str) -> None:
    """Ask the next run to retrain whatever the cadence (drift, decay, a person)."""
    db.scalar(
        settings.database_url,
        "INSERT INTO ml.retrain_requests (use_case, reason) VALUES (%s, %s) RETURNING request_id",
        (use_case, reason),
    )


def open_retrain_requests(settings: Settings, use_case: str) -> list[str]:
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT reason FROM ml.retrain_requests WHERE use_case = %s AND consumed_by_run IS NULL "
                "ORDER BY request_id",
                (use_case,),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def consume_retrain_requests(settings: Settings, use_case: str, run_id: str) -> None:
    db.scalar(
        settings.database_url,
        "UPDATE ml.retrain_requests SET consumed_by_run = %s "
        "WHERE use_case = %s AND consumed_by_run IS NULL RETURNING 1",
        (run_id, use_case),
    )


def card(mv: ModelVersion) -> dict[str, Any]:
    """The JSON card written next to the artifact (features, window, drift reference, ...),
    after checking its sha256 against the registry, as the artifact's is.

    Raises:
        ModelError: the card is missing, or was changed since the model was registered.
    """
    path = Path(mv.artifact_uri).with_name("model.json")
    if mv.card_sha256 is None:  # registered before cards were hashed
        return dict(json.loads(path.read_text())) if path.is_file() else {}
    raw = verified(
        path,
        mv.card_sha256,
        f"card of {mv.use_case} model {mv.version}",
        "its drift reference would judge tonight's data; restore the original card",
        _RESTORE_STORE,
    )
    return dict(json.loads(raw))
