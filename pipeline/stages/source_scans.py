"""Reading only the days a source table may have changed: what a night keeps of each
dated table's scan, and the server's own counters that prove the rest unchanged.

The source checks group a dated table's rows by day over its whole lookback (rows, a
content fingerprint, non-null and rule counts per day). Read every night, that scan is
most of the stage and grows with population x lookback. A night keeps what its scan found
per day (``Kept``), with PostgreSQL's cumulative counters of the table read before its
snapshot (``Counters``: rows inserted, updated and deleted, from ``pg_stat_user_tables``,
and the table's file). The next night reads the same counters before its own snapshot; a
past day can only have changed since if a row was updated or deleted, the table was
rewritten (``TRUNCATE``, ``VACUUM FULL``, a type change: a new file) or a row was inserted
on it. So when no row was updated or deleted, the file and the statistics epoch are the
same (``usable_from``), the night scans only the days from the earlier run date on, and
then proves that every row inserted since lies in what it scanned
(``accounts_for``: inserted now - inserted then = rows scanned - rows the earlier night saw
from its run date on). Anything else (a view, a partitioned or inherited table, a standby,
counters off or reset, a contract changed, a failed proof) reads the whole lookback, as
before.

Counted rows include aborted transactions' (PostgreSQL counts attempted changes): they make
the proof fail, never pass. The counters reach the shared statistics within about a second
of a writer's commit (``PGSTAT_MIN_INTERVAL``, at most a minute under lock contention): a
change committed within that time of the night's read is seen the night after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass, field, fields
from datetime import date
from typing import Any

import psycopg2

from pipeline.conf.config import Settings
from pipeline.stages.source_queries import raise_if_lost
from pipeline.stages.source_relations import KeptCount
from pipeline.store import db
from pipeline.store.ledger import RunContext

Tallies = tuple[int, ...]  # per day: non-null counts per column, then rule and NaN counts


@dataclass(frozen=True)
class Counters:
    """A table's cumulative change counters and its file, read before a snapshot."""

    relid: int
    filenode: int
    inserted: int
    updated: int
    deleted: int
    epoch: str  # when the database's statistics were last reset ("" never)


@dataclass(frozen=True)
class Kept:
    """What a night's scan of a dated table found, kept for the next night.

    ``days`` maps each day from ``first`` to the run date ``as_of`` (exclusive) that held
    rows to its rows, content fingerprint and ``Tallies``; ``beyond`` counts the rows dated
    on or after ``as_of`` it saw; ``shape`` names the scan's query (its columns, rules and
    fingerprint), so that a changed contract is never read against the old one."""

    as_of: date
    first: date
    shape: str
    counters: Counters | None
    beyond: int
    days: dict[date, tuple[int, str, Tallies]] = field(default_factory=dict)
    read_from: date | None = None  # the first day the scan read (None: not scanned here)


_COUNTERS = """
    SELECT c.relname, c.oid::bigint, pg_relation_filenode(c.oid), s.n_tup_ins, s.n_tup_upd,
           s.n_tup_del, COALESCE(CAST(d.stats_reset AS text), '')
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_stat_user_tables s ON s.relid = c.oid
    JOIN pg_stat_database d ON d.datname = current_database()
    WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
      AND c.relkind = 'r' AND NOT c.relhassubclass
      AND current_setting('track_counts') = 'on' AND NOT pg_is_in_recovery()
"""


def read_counters(conn: Any, schema: str, tables: list[str]) -> dict[str, Counters]:
    """The counters of each plain table of ``schema`` among ``tables``, in a transaction of
    their own (committed, so that the statistics are read now, before the checks' snapshot).
    Views, partitioned or inherited tables, a standby or ``track_counts`` off give none."""
    try:
        with conn.cursor() as cur:
            cur.execute(_COUNTERS, {"schema": schema, "tables": tables})
            rows = cur.fetchall()
        conn.commit()
    except psycopg2.Error as exc:
        raise_if_lost(conn, exc)
        conn.rollback()
        return {}
    return {
        str(name): Counters(int(relid), int(node), int(ins), int(upd), int(dele), str(epoch))
        for name, relid, node, ins, upd, dele, epoch in rows
        if node is not None
    }


def usable_from(kept: Kept | None, now: Counters | None, first: date, as_of: date) -> date | None:
    """The first day tonight's scan must read when ``kept`` (an earlier night's) and the
    counters ``now`` show that no day before it can have changed; None: read from ``first``.

    Tonight (run date ``as_of``) needs the days from ``first``: ``kept`` must cover them,
    from an earlier or the same run date, and the counters must show no row updated or
    deleted and the same file and statistics epoch. (Whether ``kept`` was counted by the
    same query is the scan's to check: ``Kept.shape``.)"""
    if kept is None or now is None or kept.counters is None:
        return None
    then = kept.counters
    same = (then.relid, then.filenode, then.epoch) == (now.relid, now.filenode, now.epoch)
    if not same or now.updated != then.updated or now.deleted != then.deleted:
        return None
    if now.inserted < then.inserted:
        return None
    if not kept.first <= first < kept.as_of <= as_of:
        return None
    return kept.as_of


def accounts_for(kept: Kept, now: Counters, scanned_rows: int) -> bool:
    """Whether the rows inserted since ``kept`` are all in tonight's scan from its run date
    on (``scanned_rows``): then no earlier day gained a row."""
    assert kept.counters is not None
    return now.inserted - kept.counters.inserted == scanned_rows - kept.beyond


# -- kept in the serving database (monitoring.source_days, monitoring.source_scans) --------

Evidence = dict[str, dict[date, tuple[int, str | None]]]  # per table, per day: rows, content


@dataclass(frozen=True)
class Previous:
    """The newest earlier run's run date (None: no earlier run), what it saw of each dated
    source table per day (rows and content, None where not kept), what its scans kept for
    this night (per table) and what it counted of each relation."""

    as_of: date | None = None
    days: Evidence = field(default_factory=dict)
    kept: dict[str, Kept] = field(default_factory=dict)
    counts: dict[str, KeptCount] = field(default_factory=dict)


def previous(settings: Settings, run: RunContext) -> Previous:
    """What the newest earlier run (score date before this run's) kept (``Previous``)."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT score_date, run_id FROM monitoring.source_days "
                "WHERE use_case = %s AND score_date < %s "
                "ORDER BY score_date DESC, run_id DESC LIMIT 1",
                (run.use_case, run.score_date),
            )
            found = cur.fetchone()
            if found is None:
                conn.commit()
                return Previous()
            score_date, run_id = found
            days = _run_days(cur, run.use_case, run_id)
            cur.execute(
                "SELECT source, first_day, shape, beyond, relid, filenode, inserted, updated, "
                "deleted, stats_epoch FROM monitoring.source_scans "
                "WHERE use_case = %s AND run_id = %s",
                (run.use_case, run_id),
            )
            scans = cur.fetchall()
            cur.execute(
                "SELECT relation, shape, broken FROM monitoring.source_relations "
                "WHERE use_case = %s AND run_id = %s",
                (run.use_case, run_id),
            )
            counts = {name: KeptCount(shape, int(n)) for name, shape, n in cur.fetchall()}
        conn.commit()
    finally:
        conn.close()
    kept = {}
    for source, first, shape, beyond, relid, *changes in scans:
        seen = {
            d: (n, content, tallies)
            for d, (n, content, tallies) in days.get(source, {}).items()
            if content is not None and tallies is not None
        }
        counters = None if relid is None else Counters(relid, *changes)
        kept[source] = Kept(score_date, first, shape, counters, int(beyond), seen)
    evidence = {t: {d: (n, c) for d, (n, c, _) in seen.items()} for t, seen in days.items()}
    return Previous(score_date, evidence, kept, counts)


def run_days(settings: Settings, run: RunContext) -> dict[str, dict[date, tuple[int, str]]]:
    """What this run's source checks saw of each dated source table, per day: rows and a
    fingerprint of their content (days without one left out)."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            days = _run_days(cur, run.use_case, run.run_id)
        conn.commit()
    finally:
        conn.close()
    return {
        source: {d: (n, c) for d, (n, c, _) in seen.items() if c is not None}
        for source, seen in days.items()
    }


def _run_days(
    cur: Any, use_case: str, run_id: str
) -> dict[str, dict[date, tuple[int, str | None, Tallies | None]]]:
    """The rows, content and tallies (None where not kept) per day of each source table
    that run ``run_id`` kept."""
    cur.execute(
        "SELECT source, day, rows, content, tallies FROM monitoring.source_days "
        "WHERE use_case = %s AND run_id = %s",
        (use_case, run_id),
    )
    days: dict[str, dict[date, tuple[int, str | None, Tallies | None]]] = {}
    for source, day, rows, content, counts in cur.fetchall():
        tallies = None if counts is None else tuple(int(x) for x in counts)
        days.setdefault(source, {})[day] = (int(rows), content, tallies)
    return days


def store(
    settings: Settings,
    run: RunContext,
    days: Mapping[str, Mapping[date, tuple[int, str | None]]],
    kept: Mapping[str, Kept],
    counts: Mapping[str, KeptCount],
) -> None:
    """Remember what this run saw of each dated source table, per day (rows, content and,
    where its scan kept them, tallies), what each scan keeps for the next night and what it
    counted of each relation."""
    from psycopg2.extras import execute_values

    rows = [
        (
            run.use_case,
            run.score_date,
            run.run_id,
            source,
            day,
            n,
            content,
            list(kept[source].days[day][2])
            if source in kept and day in kept[source].days
            else None,
        )
        for source, seen in days.items()
        for day, (n, content) in seen.items()
    ]
    scans = [
        (run.use_case, run.score_date, run.run_id, source, k.first, k.shape, k.beyond)
        + (astuple(k.counters) if k.counters else (None,) * len(fields(Counters)))
        for source, k in kept.items()
    ]
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            for table in ("source_days", "source_scans", "source_relations"):
                cur.execute(
                    f"DELETE FROM monitoring.{table} WHERE use_case = %s AND run_id = %s",
                    (run.use_case, run.run_id),
                )
            execute_values(
                cur,
                "INSERT INTO monitoring.source_days (use_case, score_date, run_id, source, day, "
                "rows, content, tallies) VALUES %s",
                rows,
                page_size=1000,
            )
            execute_values(
                cur,
                "INSERT INTO monitoring.source_scans (use_case, score_date, run_id, source, "
                "first_day, shape, beyond, relid, filenode, inserted, updated, deleted, "
                "stats_epoch) VALUES %s",
                scans,
            )
            execute_values(
                cur,
                "INSERT INTO monitoring.source_relations (use_case, score_date, run_id, "
                "relation, shape, broken) VALUES %s",
                [
                    (run.use_case, run.score_date, run.run_id, name, c.shape, c.broken)
                    for name, c in counts.items()
                ],
            )
        conn.commit()
    finally:
        conn.close()
