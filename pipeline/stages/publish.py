"""Publish scored rows: binary COPY into a staging table, validate, swap in atomically.

The served table is partitioned by score date. A publish

1. drops leftovers of killed attempts, whatever their date (staging tables no live
   attempt marks, see :func:`drop_leftovers`),
2. in one transaction: creates a staging table unique to this attempt with CHECKs (the
   partition bound, so ATTACH skips its scan; probabilities in [0, 1], deciles 1..10, the
   run's model version), binary COPYs the rows into it with FREEZE, in key order, adds the
   primary key (one row per key) and checks the row count against the population; it
   commits only if all of that holds,
3. in one short transaction with a lock timeout and the use case's publish lock (a row of
   ``ml.publish_locks`` locked FOR UPDATE, which only the writer can take), holding the
   served table in ACCESS EXCLUSIVE mode (so no read is planned on one side of the swap
   and run on the other): detaches and drops the date's old partition if any, attaches
   the staged table in its place, records the publication (``ml.publications``, what the
   ``_latest`` views read) and marks the run published in the ledger. On lock timeout the
   transaction is retried, so readers never queue behind a publish for long.

Readers therefore see the old rows or the new rows for a date, never a mix, a partial
set or two copies. The rows' COPY data and their deciles are ``pipeline.stages.binary_copy``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg2 import errors as pg_errors
from psycopg2 import sql

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.core.errors import PublishError, plain
from pipeline.core.faults import fault_point
from pipeline.stages.binary_copy import (
    COPY_HEADER,
    COPY_TRAILER,
    copy_columns,
    copy_rows,
    decile_thresholds,
    deciles_from_thresholds,
    key_ordered,
)
from pipeline.stages.score import ScoredPart
from pipeline.store import db, locks
from pipeline.store.ledger import RunContext

log = logging.getLogger(__name__)

SCHEMA = "predictions"
LOCK_TIMEOUT = "1s"  # the longest a reader may queue behind a waiting swap
SWAP_ATTEMPTS = 60
# Session settings of the primary key's build, in the publishing transaction
# (benchmarks/publish.py gives its baseline the same).
KEY_BUILD_SETTINGS = (("maintenance_work_mem", "256MB"),)


@dataclass(frozen=True)
class PublishResult:
    score_date: date
    rows: int
    seconds: float
    copy_seconds: float
    swap_attempts: int
    partition: str

    def as_xcom(self) -> dict[str, Any]:
        return {
            "score_date": self.score_date.isoformat(),
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "copy_seconds": round(self.copy_seconds, 3),
            "rows_per_second": round(self.rows / self.seconds) if self.seconds else None,
            "swap_attempts": self.swap_attempts,
            "partition": self.partition,
        }


@dataclass(frozen=True)
class _Publication:
    """What one attempt publishes: the use case's rows of ``run``, scored by
    ``model_version``, ``rows`` of them (the population as of the date), staged in the table
    ``stage`` (unique to the attempt) that becomes the partition ``target``."""

    uc: UseCase
    run: RunContext
    model_version: str
    rows: int
    stage: str
    target: str

    @property
    def score_date(self) -> date:
        return self.run.score_date


def risk_deciles(probabilities: np.ndarray, entity_keys: np.ndarray) -> np.ndarray:
    """Decile 1 = the 10% highest probabilities; ties broken by key so it is reproducible."""
    n = len(probabilities)
    order = np.lexsort((entity_keys, -probabilities))
    deciles = np.empty(n, dtype=np.int16)
    deciles[order] = (np.arange(n) * 10 // max(n, 1) + 1).astype(np.int16)
    return deciles


def partition_name(uc: UseCase, score_date: date) -> str:
    return f"{uc.score_table}_p{score_date:%Y%m%d}"


class _CopyStream:
    """The night's rows as a file-like object for ``copy_expert``: binary COPY data, batch by
    batch, in key order, each row with its global risk decile and control-group flag.

    A thread reads and encodes up to ``AHEAD`` batches ahead while the server takes the
    previous ones (Parquet, numpy and Arrow release the GIL), so reading the parts overlaps
    the COPY. Call :meth:`close` when the COPY is over, however it ended.
    """

    AHEAD = 2

    def __init__(
        self, pub: _Publication, parts: list[ScoredPart], thresholds: list[tuple[float, Any]]
    ) -> None:
        # psycopg2 turns an exception raised in read() into QueryCanceled: keep the original
        self.error: BaseException | None = None
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self.AHEAD)
        self._closing = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce,
            args=(self._encode(pub, parts, thresholds),),
            name="copy-encode",
            daemon=True,
        )
        self._thread.start()

    def _produce(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as exc:  # raised again by read(), in the COPY's thread
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    @staticmethod
    def _encode(
        pub: _Publication, parts: list[ScoredPart], thresholds: list[tuple[float, Any]]
    ) -> Iterator[bytes]:
        uc, score_date = pub.uc, pub.score_date
        yield COPY_HEADER
        columns = [uc.entity_key, uc.probability_column]
        for i, batch in enumerate(key_ordered(parts, columns, uc.serving.batch_rows * 4)):
            key_column, prob_column = batch.column(0), batch.column(1)
            if key_column.null_count or prob_column.null_count:
                raise PublishError(
                    f"scored rows for {score_date} hold a null {uc.entity_key} or "
                    f"{uc.probability_column} ({SCHEMA}.{uc.score_table} allows none); "
                    "re-score the night; nothing was published"
                )
            entity_keys = keys.to_numpy(key_column)
            probs = prob_column.to_numpy()
            yield copy_rows(
                score_date,
                pub.model_version,
                key_column,
                probs,
                deciles_from_thresholds(probs, entity_keys, thresholds),
                usecase.control_members(entity_keys, uc),
            )
            if i == 0:  # the first batch is on its way: the COPY is in progress
                fault_point("during_copy")
        yield COPY_TRAILER

    def read(self, size: int = -1) -> bytes:
        if self._done:
            return b""
        try:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        except BaseException as exc:
            self.error = exc
            raise
        if item is None:
            self._done = True
            return b""
        return item

    def close(self) -> None:
        self._closing.set()
        self._thread.join()


def publish_scores(
    settings: Settings,
    uc: UseCase,
    run: RunContext,
    model_version: str,
    parts: list[ScoredPart],
    expected_rows: int,
) -> PublishResult:
    """Publish the scored parts for ``run.score_date``; re-running replaces, never appends.

    Raises:
        PublishError: staged rows failed validation or the swap kept timing out. Nothing
            is published in that case and the previous rows stay served.
    """
    began = time.monotonic()
    pub = _Publication(
        uc,
        run,
        model_version,
        expected_rows,
        stage=f"{uc.score_table}_stage_{run.score_date:%Y%m%d}_{secrets.token_hex(4)}",
        target=partition_name(uc, run.score_date),
    )
    drop_leftovers(settings, uc)
    # Marked live from before the staging table exists until it is attached or dropped.
    with _staged(settings, pub.stage) as conn:
        copy_began = time.monotonic()
        _stage(conn, pub, parts)
        copy_seconds = time.monotonic() - copy_began
        fault_point("after_validation")
        attempts = _swap(conn, pub)
    result = PublishResult(
        run.score_date, expected_rows, time.monotonic() - began, copy_seconds, attempts, pub.target
    )
    log.info("published %s %s: %s", uc.name, run.score_date, result.as_xcom())
    return result


def _stage(conn: Any, pub: _Publication, parts: list[ScoredPart]) -> None:
    """Create, fill and validate the staging table in one transaction, committed only valid.

    The table is created in the transaction that COPYs into it, so the COPY can FREEZE its
    rows (nothing else sees the table before the commit): neither the key build nor a later
    vacuum has to revisit the pages to mark them committed or frozen. The CHECKs are in
    place before the COPY, which verifies each row as it arrives; the primary key is built
    after it, in one sorted pass over the heap.
    """
    uc, score_date, model_version = pub.uc, pub.score_date, pub.model_version
    ident = sql.Identifier(SCHEMA, pub.stage)
    thresholds = decile_thresholds(uc, parts, uc.serving.batch_rows * 4)
    with conn.cursor() as cur:
        _create_like(cur, pub.stage, uc.score_table)
        _add_checks(cur, pub)
        rows_in = _CopyStream(pub, parts, thresholds)
        try:
            cur.copy_expert(
                sql.SQL("COPY {t} ({cols}) FROM STDIN WITH (FORMAT binary, FREEZE)")
                .format(t=ident, cols=sql.SQL(", ").join(map(sql.Identifier, copy_columns(uc))))
                .as_string(conn),
                rows_in,
                size=1 << 20,
            )
        except pg_errors.QueryCanceled:
            if rows_in.error is not None:
                raise rows_in.error from None
            raise
        except pg_errors.CheckViolation as exc:
            raise PublishError(
                f"scored rows for {score_date} violate the contract of {SCHEMA}.{uc.score_table} "
                f"({uc.probability_column} in [0, 1], decile 1..10, score_date = {score_date}, "
                f"model_version = {model_version}): {str(exc).splitlines()[0]}; nothing was published"
            ) from exc
        finally:
            rows_in.close()
        rows = cur.rowcount
        if rows != pub.rows:
            raise PublishError(
                f"staged {SCHEMA}.{uc.score_table} for {score_date} has {rows} rows, expected "
                f"{pub.rows} (the population as of that date); nothing was published"
            )
        for name, value in KEY_BUILD_SETTINGS:
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        try:
            cur.execute(
                sql.SQL("ALTER TABLE {t} ADD PRIMARY KEY (score_date, {key})").format(
                    t=ident, key=sql.Identifier(uc.entity_key)
                )
            )
        except pg_errors.UniqueViolation as exc:
            raise PublishError(
                f"staged {SCHEMA}.{uc.score_table} rows for {score_date} are not one row per "
                f"{uc.entity_key}: {exc.pgerror.strip() if exc.pgerror else exc}; nothing was published"
            ) from exc
    conn.commit()


def _create_like(cur: Any, table: str, template: str) -> None:
    """A new staging table shaped like ``template`` (columns, NOT NULLs, defaults)."""
    cur.execute(
        sql.SQL("CREATE TABLE {s}.{t} (LIKE {s}.{template} INCLUDING DEFAULTS)").format(
            s=sql.Identifier(SCHEMA), t=sql.Identifier(table), template=sql.Identifier(template)
        )
    )


def _add_checks(cur: Any, pub: _Publication) -> None:
    """CHECKs on the empty staging table, so COPY verifies every row as it arrives.

    The partition-bound CHECK also lets ATTACH PARTITION skip its validation scan.
    """
    stage = pub.stage
    cur.execute(
        sql.SQL(
            "ALTER TABLE {t} "
            "ADD CONSTRAINT {chk} CHECK (score_date >= {lo} AND score_date < {hi}), "
            "ADD CONSTRAINT {prob} CHECK ({p} >= 0 AND {p} <= 1), "
            "ADD CONSTRAINT {dec} CHECK (risk_decile BETWEEN 1 AND 10), "
            "ADD CONSTRAINT {ver} CHECK (model_version = {v})"
        ).format(
            t=sql.Identifier(SCHEMA, stage),
            chk=sql.Identifier(f"{stage}_bound"),
            prob=sql.Identifier(f"{stage}_prob"),
            dec=sql.Identifier(f"{stage}_decile"),
            ver=sql.Identifier(f"{stage}_version"),
            p=sql.Identifier(pub.uc.probability_column),
            lo=sql.Literal(pub.score_date),
            hi=sql.Literal(pub.score_date + timedelta(days=1)),
            v=sql.Literal(pub.model_version),
        )
    )


def _locked(conn: Any, uc: UseCase, what: str, body: Callable[[Any], None]) -> int:
    """Run ``body(cursor)`` in one transaction holding the use case's publish lock.

    ``lock_timeout`` keeps the transaction from queueing readers behind it; on timeout it
    is rolled back and retried. Returns the attempt that committed.

    Raises:
        PublishError: every attempt timed out; the message names the sessions holding the
            publish lock or a lock on the served table at the last one.
    """
    holders: list[locks.Session] = []
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        try:
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))
                )
                # a row lock only the writer can take (readers have no privilege on ml.*)
                cur.execute(
                    "INSERT INTO ml.publish_locks (use_case) VALUES (%s) ON CONFLICT DO NOTHING",
                    (uc.name,),
                )
                cur.execute(
                    "SELECT 1 FROM ml.publish_locks WHERE use_case = %s FOR UPDATE", (uc.name,)
                )
                body(cur)
            conn.commit()
            return attempt
        except pg_errors.LockNotAvailable:
            conn.rollback()
            with conn.cursor() as cur:
                holders = locks.row_holders(
                    cur, "ml.publish_locks", "use_case = %s", (uc.name,)
                ) + locks.table_holders(cur, f"{SCHEMA}.{uc.score_table}")
            conn.rollback()
            log.warning(
                "%s: lock timeout (attempt %d), held by %s; retrying",
                what,
                attempt,
                "; ".join(str(h) for h in holders) or "-",
            )
            time.sleep(min(0.2 * attempt, 2.0))
    blockers = "; ".join(dict.fromkeys(str(h) for h in holders)) or "a session gone since"
    raise PublishError(
        f"{what}: lock timeout ({LOCK_TIMEOUT}) {SWAP_ATTEMPTS} times in a row on the publish "
        f"lock (ml.publish_locks) and {SCHEMA}.{uc.score_table}, expected them free within "
        f"that time; at the last attempt held by {blockers}; nothing changed and the previous "
        "rows stay served; let that session finish (or end it with pg_terminate_backend) and "
        "publish again"
    )


def _swap(conn: Any, pub: _Publication) -> int:
    """Put the staged table in the place of the date's partition, record the publication
    and mark the run published, in one transaction holding the publish lock (``_locked``).
    Returns the attempt that committed."""
    uc, run, stage, target, rows = pub.uc, pub.run, pub.stage, pub.target, pub.rows
    schema = sql.Identifier(SCHEMA)
    parent = sql.Identifier(SCHEMA, uc.score_table)

    def swap(cur: Any) -> None:
        # ATTACH alone takes only SHARE UPDATE EXCLUSIVE on the served table: a read planned
        # before this commit (without tonight's partition) but run after it (seeing tonight's
        # publication) would count nothing. Locking the table first lets reads in flight
        # finish on the old night; reads that arrive wait for the commit (lock_timeout
        # bounds that) and are planned afresh.
        cur.execute(sql.SQL("LOCK TABLE {p} IN ACCESS EXCLUSIVE MODE").format(p=parent))
        cur.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.{target}",))
        if cur.fetchone()[0] is not None:
            cur.execute(
                sql.SQL("ALTER TABLE {p} DETACH PARTITION {s}.{t}").format(
                    p=parent, s=schema, t=sql.Identifier(target)
                )
            )
            cur.execute(sql.SQL("DROP TABLE {s}.{t}").format(s=schema, t=sql.Identifier(target)))
        cur.execute(
            sql.SQL("ALTER TABLE {s}.{stage} RENAME TO {t}").format(
                s=schema, stage=sql.Identifier(stage), t=sql.Identifier(target)
            )
        )
        cur.execute(
            sql.SQL(
                "ALTER TABLE {p} ATTACH PARTITION {s}.{t} FOR VALUES FROM ({lo}) TO ({hi})"
            ).format(
                p=parent,
                s=schema,
                t=sql.Identifier(target),
                lo=sql.Literal(run.score_date),
                hi=sql.Literal(run.score_date + timedelta(days=1)),
            )
        )
        cur.execute(
            """
            UPDATE ml.runs SET status = 'published', rows_published = %s, finished_at = now(),
                error = NULL
            WHERE use_case = %s AND score_date = %s AND run_id = %s
            """,
            (rows, run.use_case, run.score_date, run.run_id),
        )
        # what is served is recorded here, in the swap's own transaction
        cur.execute(
            """
            INSERT INTO ml.publications (use_case, score_date, run_id, model_version, rows,
                snapshot_sha256)
            SELECT %(uc)s, %(d)s, %(run)s, %(version)s, %(rows)s,
                   (SELECT snapshot_sha256 FROM ml.runs
                    WHERE use_case = %(uc)s AND score_date = %(d)s AND run_id = %(run)s)
            ON CONFLICT (use_case, score_date) DO UPDATE SET
                run_id = EXCLUDED.run_id, model_version = EXCLUDED.model_version,
                rows = EXCLUDED.rows, snapshot_sha256 = EXCLUDED.snapshot_sha256,
                published_at = now()
            """,
            {
                "uc": run.use_case,
                "d": run.score_date,
                "run": run.run_id,
                "version": pub.model_version,
                "rows": rows,
            },
        )
        fault_point("inside_swap")

    attempt = _locked(conn, uc, f"swap of {SCHEMA}.{target}", swap)
    fault_point("after_swap")
    return attempt


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching itself (``_`` and ``%`` escaped)."""
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


STAGE_MARK = "stage."  # ml.locks key of a staging table's liveness mark: prefix + table name
# A mark older than this whose table does not exist was left by a killed process (a live
# attempt creates its table right after marking it).
ORPHAN_MARK_AGE = "1 hour"


@contextmanager
def _staged(settings: Settings, table: str) -> Iterator[Any]:
    """A connection for building the staging table ``table``, marked as a live attempt's
    while the block runs; on any error the transaction is rolled back and the table dropped."""
    with locks.mark(
        settings.database_url,
        STAGE_MARK + table,
        what=f"liveness mark of staging table {SCHEMA}.{table}",
    ):
        conn = db.connect(settings.database_url)
        try:
            yield conn
        except BaseException:
            if not conn.closed:  # a terminated backend takes its transaction with it
                conn.rollback()
                _drop_quietly(conn, table)
            raise
        finally:
            conn.close()


def drop_leftovers(settings: Settings, uc: UseCase) -> list[str]:
    """Drop the staging tables (served and shadow) left by killed attempts, whatever their date.

    A live attempt marks its staging table (its ``ml.locks`` row, held ``FOR KEY SHARE`` by
    a connection of the attempt's, see :func:`pipeline.store.locks.mark`) from before it creates
    the table until it has attached or dropped it; a killed process's mark goes with its
    connection. A table whose row no one holds (``FOR UPDATE SKIP LOCKED`` returns it; a
    table without a row gets one) is dropped with its row, one transaction each. Only the
    writer can lock those rows: a reader can neither keep a leftover nor stop a publish.
    Each COPY stream commits on its own, so a leftover may hold a whole night of rows.

    Returns:
        the staging tables dropped.
    """
    prefixes = (f"{uc.score_table}_stage_", f"{uc.score_table}_shadow_stage_")
    conn = db.connect(settings.database_url)
    dropped = []
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s "
                "AND (tablename LIKE %s OR tablename LIKE %s)",
                (SCHEMA, *(_like(p) + "%" for p in prefixes)),
            )
            names = [r[0] for r in cur.fetchall()]
        conn.commit()
        for name in names:
            key = STAGE_MARK + name
            try:
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL lock_timeout = '200ms'")
                    cur.execute(
                        "INSERT INTO ml.locks (key) VALUES (%s) ON CONFLICT DO NOTHING", (key,)
                    )
                    cur.execute(
                        "SELECT 1 FROM ml.locks WHERE key = %s FOR UPDATE SKIP LOCKED", (key,)
                    )
                    if cur.fetchone() is None:
                        conn.rollback()
                        continue  # a live attempt marks it
                    cur.execute(
                        sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                            sql.Identifier(SCHEMA), sql.Identifier(name)
                        )
                    )
                    cur.execute("DELETE FROM ml.locks WHERE key = %s", (key,))
                conn.commit()
                dropped.append(name)
            except pg_errors.LockNotAvailable:
                conn.rollback()  # in use after all: the next publish will try again
        with conn.cursor() as cur:
            # marks of attempts killed before creating their table or after attaching it
            cur.execute(
                """
                DELETE FROM ml.locks WHERE key IN (
                    SELECT key FROM ml.locks
                    WHERE (key LIKE %(served)s OR key LIKE %(shadow)s)
                      AND created_at < now() - %(age)s::interval
                      AND to_regclass(format('%%I.%%I', %(schema)s::text,
                                             substr(key, length(%(mark)s) + 1))) IS NULL
                    FOR UPDATE SKIP LOCKED)
                """,
                {
                    "served": _like(STAGE_MARK + prefixes[0]) + "%",
                    "shadow": _like(STAGE_MARK + prefixes[1]) + "%",
                    "age": ORPHAN_MARK_AGE,
                    "schema": SCHEMA,
                    "mark": STAGE_MARK,
                },
            )
        conn.commit()
    finally:
        conn.close()
    if dropped:
        log.info("dropped leftover staging tables: %s", dropped)
    return dropped


def _drop_quietly(conn: Any, table: str) -> None:
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                    sql.Identifier(SCHEMA), sql.Identifier(table)
                )
            )
        conn.commit()
    except Exception:
        conn.rollback()
        log.warning("could not drop staging table %s.%s; the next publish will", SCHEMA, table)


def publish_shadow(
    settings: Settings, uc: UseCase, run: RunContext, shadow_version: str, part: ScoredPart
) -> int:
    """Replace the shadow scores of (score date, shadow version) in one transaction.

    Shadow rows go to ``<score table>_shadow``, never to the served table.
    """
    shadow_table = f"{uc.score_table}_shadow"
    stage = f"{shadow_table}_stage_{secrets.token_hex(4)}"
    table = pq.read_table(part.path)
    entity_keys = keys.to_numpy(table.column(uc.entity_key))
    probs = table.column(uc.probability_column).to_numpy()
    n = len(entity_keys)
    data = pa.table(
        {
            "score_date": pa.array(
                np.full(n, (run.score_date - date(1970, 1, 1)).days, dtype=np.int32)
            ).cast(pa.date32()),
            "model_version": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, dtype=np.int32)), pa.array([shadow_version])
            ).cast(pa.string()),
            uc.entity_key: table.column(uc.entity_key),
            uc.probability_column: pa.array(probs),
            "risk_decile": pa.array(risk_deciles(probs, entity_keys)),
        }
    )
    drop_leftovers(settings, uc)
    with _staged(settings, stage) as conn:
        with conn.cursor() as cur:
            _create_like(cur, stage, shadow_table)
        conn.commit()
        db.ingest(settings.database_url, stage, data, SCHEMA)
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DELETE FROM {s}.{t} WHERE score_date = %s AND model_version = %s").format(
                    s=sql.Identifier(SCHEMA), t=sql.Identifier(shadow_table)
                ),
                (run.score_date, shadow_version),
            )
            cur.execute(
                sql.SQL("INSERT INTO {s}.{t} SELECT * FROM {s}.{stage}").format(
                    s=sql.Identifier(SCHEMA),
                    t=sql.Identifier(shadow_table),
                    stage=sql.Identifier(stage),
                )
            )
            cur.execute(
                sql.SQL("DROP TABLE {s}.{stage}").format(
                    s=sql.Identifier(SCHEMA), stage=sql.Identifier(stage)
                )
            )
        conn.commit()
    return n


def published_partitions(conn: Any, uc: UseCase) -> list[tuple[date, str]]:
    """(score date, partition table) of every attached partition, newest first."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT c.relname FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            JOIN pg_class p ON p.oid = i.inhparent
            JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = %s AND p.relname = %s
            """,
            (SCHEMA, uc.score_table),
        )
        names = [r[0] for r in cur.fetchall()]
    prefix = f"{uc.score_table}_p"
    out = [
        (datetime.strptime(n.removeprefix(prefix), "%Y%m%d").date(), n)
        for n in names
        if n.startswith(prefix)
    ]
    return sorted(out, reverse=True)


def apply_retention(settings: Settings, uc: UseCase, run: RunContext, keep: int) -> list[date]:
    """Drop the partitions of all but the ``keep`` newest score dates, atomically, and log it.

    One transaction (lock timeout, the publish lock): either every expired
    partition is detached and dropped, or none is. Each drop is logged in ``ml.retention_log``.
    """
    fault_point("retention")
    conn = db.connect(settings.database_url)
    try:
        expired = published_partitions(conn, uc)[keep:]
        conn.commit()
        if not expired:
            return []

        def drop(cur: Any) -> None:
            for day, name in expired:
                table = sql.Identifier(SCHEMA, name)
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
                rows = cur.fetchone()[0]
                cur.execute(
                    sql.SQL("ALTER TABLE {p} DETACH PARTITION {t}").format(
                        p=sql.Identifier(SCHEMA, uc.score_table), t=table
                    )
                )
                cur.execute(sql.SQL("DROP TABLE {}").format(table))
                cur.execute(
                    "DELETE FROM ml.publications WHERE use_case = %s AND score_date = %s",
                    (uc.name, day),
                )
                cur.execute(
                    "INSERT INTO ml.retention_log (use_case, score_date, partition_name, rows, keep, run_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (uc.name, day, name, rows, keep, run.run_id),
                )

        _locked(
            conn, uc, f"retention of {len(expired)} partitions of {SCHEMA}.{uc.score_table}", drop
        )
    finally:
        conn.close()
    log.info(
        "retention: dropped %s (keeping the %d newest dates)", plain([d for d, _ in expired]), keep
    )
    return [d for d, _ in expired]
