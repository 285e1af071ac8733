"""Locks only the writer can take, and liveness marks no other role can fake or block.

Every lock the pipeline relies on is a row lock on a table of ``ml`` (``ml.locks``,
``ml.runs``, ``ml.publish_locks``), never an advisory lock. An advisory lock is keyed by
a number anyone connected can compute and take: an application connected as
``nightscore_reader`` holding ``pg_advisory_lock(hashtext('nightscore.ledger.<use case>.
<date>'))`` made that night hang at ``start_run``, and holding a run's liveness key
would have kept a dead attempt ``running`` for ever. Locking a row (``FOR UPDATE``,
``FOR KEY SHARE``) needs the UPDATE privilege on its table, and readers have no privilege
on ``ml.*``, not even USAGE on the schema (``sql/schema/990_roles.sql``): they can
neither take such a lock, nor wait on one in a way that holds up the pipeline.

Two kinds:

- :func:`lock`, exclusive until the caller's transaction ends, serializes a short
  critical section (a ledger start, a registry change). Its wait is bounded by a lock
  timeout; past it the transaction is rolled back and :class:`LockTimeout` names the
  sessions holding the lock.
- :func:`held` and :func:`mark`, a liveness mark: a connection of its own keeps a
  transaction open holding ``FOR KEY SHARE`` on rows for as long as a block runs. The
  mode is shared, so the parallel tasks of one run hold it together; when a process dies
  its connection drops, the server ends its transaction and the rows are free. A prober
  selecting ``FOR UPDATE SKIP LOCKED`` gets exactly the rows no live process marks.

Why row locks rather than recording the holder's backend pid and start time: with the
pipeline connected as ``SET ROLE nightscore_writer``, ``pg_stat_activity`` hides the
backend start of sessions of other logins (it shows it to members of the session's login
role or of ``pg_read_all_stats`` only), so a dead holder's pid could not be told from the
same pid reused. The price of a held row lock: the marking transaction has a transaction
id while the block runs, which holds back vacuum's horizon for as long as a stage lasts
(minutes), and it idles in its transaction on purpose, so
``idle_in_transaction_session_timeout`` is switched off for that connection only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2 import errors as pg_errors

from pipeline.core.errors import LockTimeout
from pipeline.store import db

log = logging.getLogger(__name__)

# The longest the pipeline waits for one of its locks. Legitimate holders are its own
# transactions of milliseconds; a longer wait means a stuck session, which the error names.
LOCK_TIMEOUT = "10s"
MARK_APPLICATION = "nightscore liveness"  # application_name of the marking connections

_SESSIONS = """
SELECT DISTINCT a.pid, a.usename, a.application_name, a.backend_start, a.state,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid() AND {condition}
ORDER BY a.pid
"""


@dataclass(frozen=True)
class Session:
    """A server session, as much of it as ``pg_stat_activity`` shows the caller.

    ``backend_start``, ``state`` and ``query`` are shown only for sessions of the caller's
    role (or to ``pg_read_all_stats``); otherwise they are None or ``<insufficient
    privilege>``.
    """

    pid: int
    user: str | None
    application: str | None
    backend_start: datetime | None
    state: str | None
    query: str | None

    def __str__(self) -> str:
        parts = [f"user {self.user}", f"application {self.application or ''!r}"]
        if self.backend_start is not None:
            parts.append(f"connected {self.backend_start:%Y-%m-%d %H:%M:%S%z}")
        if self.state:
            parts.append(self.state)
        if self.query and self.query != "<insufficient privilege>":
            parts.append(f"last query {self.query!r}")
        return f"pid {self.pid} ({', '.join(parts)})"


def _sessions(cur: Any, condition: str, params: tuple[Any, ...]) -> list[Session]:
    cur.execute(_SESSIONS.format(condition=condition), params)
    return [Session(*row) for row in cur.fetchall()]


def row_holders(cur: Any, table: str, where: str, params: tuple[Any, ...]) -> list[Session]:
    """The sessions whose open transactions lock the rows of ``table`` matching ``where``.

    ``table`` and ``where`` are fixed SQL text of the caller's (never input); the values go
    in ``params``. Found from each row's ``xmax`` (the locking transaction) in
    ``pg_locks``; a row locked by several transactions at once (a multixact) or by a
    released savepoint shows no holder.
    """
    return _sessions(
        cur,
        f"l.locktype = 'transactionid' AND l.transactionid IN (SELECT xmax FROM {table} "
        f"WHERE {where})",
        params,
    )


def table_holders(cur: Any, table: str) -> list[Session]:
    """The sessions holding any lock on ``table`` (``schema.name``), e.g. a long read."""
    return _sessions(cur, "l.locktype = 'relation' AND l.relation = to_regclass(%s)", (table,))


def timeout_error(what: str, lock: str, limit: str, holders: list[Session]) -> LockTimeout:
    """The error of a lock still held after ``limit``, naming its holders and what to do."""
    if holders:
        found = "held by " + "; ".join(str(s) for s in holders)
        fix = (
            "let that session finish, or end it if it is stuck "
            f"(SELECT pg_terminate_backend({holders[0].pid})), then retry"
        )
    else:
        found = "held by a session that has let go since"
        fix = "retry; if it recurs, look for long transactions in pg_stat_activity"
    return LockTimeout(
        f"{what}: waited {limit} (lock timeout) for {lock}, which only nightscore_writer can "
        f"lock; expected it free within that time, found it {found}; {fix}"
    )


def lock(cur: Any, key: str, *, what: str, timeout: str | None = None) -> None:
    """Hold the lock ``key`` (its row of ``ml.locks``, FOR UPDATE) until the transaction ends.

    Waits at most ``timeout`` (a PostgreSQL duration, default :data:`LOCK_TIMEOUT`); the
    session's own ``lock_timeout`` applies again once the lock is held. ``what`` names the
    operation in the error.

    Raises:
        LockTimeout: another session held the lock past the timeout. The caller's
            transaction has been rolled back; the message names the holders.
    """
    limit = timeout or LOCK_TIMEOUT
    cur.execute("SELECT current_setting('lock_timeout')")
    previous = cur.fetchone()[0]
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (limit,))
    try:
        cur.execute("SELECT 1 FROM ml.locks WHERE key = %s FOR UPDATE", (key,))
        if cur.fetchone() is None:  # the lock's first use: its row is created
            cur.execute("INSERT INTO ml.locks (key) VALUES (%s) ON CONFLICT DO NOTHING", (key,))
            cur.execute("SELECT 1 FROM ml.locks WHERE key = %s FOR UPDATE", (key,))
    except pg_errors.LockNotAvailable:
        cur.connection.rollback()
        # A row still being created is invisible to others: its creator is the session
        # writing ml.locks (lockers of existing rows only read it).
        holders = row_holders(cur, "ml.locks", "key = %s", (key,)) or _sessions(
            cur,
            "l.locktype = 'relation' AND l.relation = 'ml.locks'::regclass "
            "AND l.mode = 'RowExclusiveLock'",
            (),
        )
        cur.connection.rollback()
        raise timeout_error(
            what, f"the lock {key!r} (its row of ml.locks)", limit, holders
        ) from None
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))


def _marking_connection(url: str) -> Any:
    conn = db.connect(url, application_name=MARK_APPLICATION)
    with conn.cursor() as cur:
        cur.execute("SET idle_in_transaction_session_timeout = 0")  # idling is its purpose
    conn.commit()
    return conn


def _hold(conn: Any, table: str, where: str, params: tuple[Any, ...], what: str) -> int:
    """Lock the rows FOR KEY SHARE in a transaction left open; returns how many."""
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))
        try:
            cur.execute(f"SELECT 1 FROM {table} WHERE {where} FOR KEY SHARE", params)
        except pg_errors.LockNotAvailable:
            conn.rollback()
            holders = row_holders(cur, table, where, params)
            conn.rollback()
            raise timeout_error(what, f"its rows of {table}", LOCK_TIMEOUT, holders) from None
        return int(cur.rowcount)


@contextmanager
def held(url: str, table: str, where: str, params: tuple[Any, ...], *, what: str) -> Iterator[int]:
    """Mark the rows of ``table`` matching ``where`` as live while the block runs.

    A connection of its own holds ``FOR KEY SHARE`` on them (shared with other markers;
    ordinary UPDATEs of the rows are not blocked) until the block ends or the process
    dies. ``table`` and ``where`` are fixed SQL text of the caller's; yields the number of
    rows marked (0 when none matches: there is nothing to mark).

    Raises:
        LockTimeout: a session held one of the rows ``FOR UPDATE`` (or was deleting it)
            for longer than :data:`LOCK_TIMEOUT`.
    """
    conn = _marking_connection(url)
    try:
        yield _hold(conn, table, where, params, what)
    finally:
        conn.close()


@contextmanager
def mark(url: str, key: str, *, what: str) -> Iterator[None]:
    """Mark ``key`` (a row of ``ml.locks``, created here) as live while the block runs.

    The row is committed first, then held as :func:`held` does; when the block ends it is
    released and deleted. A killed process leaves its row unheld: a prober's ``FOR UPDATE
    SKIP LOCKED`` returns it, and the prober deletes it with what it marked.
    """
    conn = _marking_connection(url)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO ml.locks (key) VALUES (%s) ON CONFLICT DO NOTHING", (key,))
        conn.commit()
        _hold(conn, "ml.locks", "key = %s", (key,), what)
        try:
            yield
        finally:
            _forget(conn, key)
    finally:
        conn.close()


def _forget(conn: Any, key: str) -> None:
    """Release and delete a mark; never hides the error the block may be raising."""
    try:
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("DELETE FROM ml.locks WHERE key = %s", (key,))
        conn.commit()
    except Exception:
        log.warning("could not delete the mark %r; the next sweep of leftovers will", key)
