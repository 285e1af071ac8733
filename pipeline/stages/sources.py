"""Source contracts: the warehouse tables a use case reads, declared in YAML and checked
before featurizing.

A contract (``usecases/<name>/contract.yaml``) names each table, its columns and their
types, the column that dates a row, and the checks to run on it: freshness, daily
volume, value rules, unique keys, null fractions and references to another table's key.
``check_sources`` turns a contract into ``CheckResult`` values for the gate in
``pipeline.stages.checks``; the code holds no table or column name of any warehouse. Each
table's checks are ``pipeline.stages.table_checks``; how a query reads the warehouse,
``pipeline.stages.source_queries``; the volume rule (``judge_day``) and the history
rewritten since an earlier run (``rewritten_days``), ``pipeline.stages.source_days``.

Time semantics: a run scores day D (``as_of``). Facts strictly before D count and the
last complete day is D-1. The day of a row is its ``date`` column as is, the date of a
``timestamp`` column (a local time in the contract's time zone), or the date of a
``timestamptz`` column in that time zone. Range predicates compare the raw column with
bounds of its own type, so an index on the column serves them.

A check whose query fails in PostgreSQL (a bad rule, a permission denied, a statement
timeout) becomes a failed check naming the table, the column where there is one, and the
first line of the error, and the other checks go on. An unreachable warehouse or a lost
connection raises ``SourceError``; a time zone PostgreSQL does not know, ``ConfigError``.
Rules are SQL text from the contract: they run in a read-only transaction.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

import psycopg2
from psycopg2 import sql

from pipeline.conf.contract import _DAY_KINDS, Contract, Relation, TableSpec, dated_tables
from pipeline.core.errors import SourceError
from pipeline.core.faults import fault_point
from pipeline.stages.checks import CheckResult
from pipeline.stages.source_queries import (
    FLOATING,
    STAGE,
    Axis,
    Failure,
    QueryFailed,
    as_day,
    begin,
    catalog,
    first_line,
    raise_if_lost,
    run_query,
    settle,
    unique_indexes,
)
from pipeline.stages.source_relations import Counted, KeptCount, RelationCheck
from pipeline.stages.source_scans import Kept, read_counters
from pipeline.stages.table_checks import Scope, TableChecks
from pipeline.store import db

log = logging.getLogger(__name__)


def _shape(target: str, spec: TableSpec, columns: Mapping[str, str] | None) -> list[CheckResult]:
    """Failures of the table's existence, columns and types (empty when all match)."""
    if columns is None:
        return [CheckResult(STAGE, "table_exists", target, False, "the table", "no such table")]
    out = []
    for column, declared in spec.columns.items():
        data_type = columns.get(column)
        if data_type is None:
            out.append(
                CheckResult(
                    STAGE,
                    "column_exists",
                    f"{target}.{column}",
                    False,
                    f"column of type {declared.type}",
                    f"no such column (columns: {', '.join(sorted(columns))})",
                )
            )
        elif not declared.accepts(data_type):
            out.append(
                CheckResult(
                    STAGE, "column_type", f"{target}.{column}", False, declared.type, data_type
                )
            )
    return out


@dataclass(frozen=True)
class Observation:
    """What the source checks found, and per day each dated table held before the run date
    (over its lookback) its rows and a fingerprint of their content: what a later run
    compares to see history rewritten (``rewritten_days``)."""

    results: list[CheckResult]
    days: dict[str, dict[date, tuple[int, str]]]
    kept: dict[str, Kept] = field(default_factory=dict)  # for the next night (``source_scans``)
    counts: dict[str, KeptCount] = field(default_factory=dict)  # each relation's, the same


def check_sources(
    url: str,
    schema: str,
    contract: Contract,
    as_of: date,
    timezone: str = "UTC",
    entity_key: str | None = None,
) -> list[CheckResult]:
    """Check every table of ``contract`` in ``schema`` before featurizing day ``as_of``.

    See :func:`observe`, which also returns the rows per day it counted.
    """
    return observe(url, schema, contract, as_of, timezone, entity_key).results


def observe(
    url: str,
    schema: str,
    contract: Contract,
    as_of: date,
    timezone: str = "UTC",
    entity_key: str | None = None,
    history_days: Mapping[str, int] | None = None,
    session: Mapping[str, str] | None = None,
    kept: Mapping[str, Kept] | None = None,
    counts: Mapping[str, KeptCount] | None = None,
) -> Observation:
    """Check every table of ``contract`` in ``schema`` before featurizing day ``as_of``.

    Facts strictly before ``as_of`` count; the last complete day is ``as_of - 1``. Per
    table: existence, columns and types (only failures are reported); then, if the shape
    matches, no rows dated in the future (on or after the run date for a run of today,
    after today for a backfill; days in the time zone, from the server's clock), freshness
    through the last day, the last day's volume against the trailing median and every day
    of the window against the window's median, value rules over rows dated in
    ``[as_of - window_days, as_of)``, unique (fact) keys over the whole table, NaN and
    infinite values in floating and numeric columns, and null fractions over the window
    (the entity key and ``not_null`` columns: none at all; failures only); and each column
    that ``references`` a key of another table: rows dated on the contract's new days
    (``[as_of - new_days, as_of)``, by default the last day) whose key that table lacks
    (orphans) fail above ``max_orphan_fraction``, naming a few such keys. A table without
    a date column is checked as a whole and has no time-based checks. Then each relation
    (a rule across two joined tables). Per dated table it keeps, for each day of the
    ``history_days`` (table -> days) before ``as_of`` (at least the window), the rows and a
    fingerprint of the declared columns' content (``Observation.days``).

    Days of timestamp columns are counted in ``contract.timezone``, else ``timezone``.
    All checks read one consistent, read-only snapshot, each connection with the PostgreSQL
    settings ``session`` (the use case's ``warehouse.session``).

    ``kept`` is what an earlier night's scans found per dated table (``Observation.kept``):
    a table whose change counters show no earlier day changed since is read from that
    night's run date on (``pipeline.stages.source_scans``); ``counts`` (``Observation.counts``)
    what it counted of each relation, so that tonight counts only the pairs with a newer
    row (``pipeline.stages.source_relations``).

    Returns:
        One ``CheckResult`` per check (stage ``sources``); a check whose query PostgreSQL
        rejected is a failed result whose ``found`` starts with "the check's query failed".

    Raises:
        SourceError: the warehouse is unreachable or the connection was lost.
        ConfigError: PostgreSQL does not know the time zone.
    """
    as_of = as_day(as_of)
    zone = contract.timezone or timezone
    conn = db.connect(url)
    try:
        counters = read_counters(conn, schema, dated_tables(contract))
        with conn.cursor() as cur:
            today = begin(conn, cur, zone, session)
            exported = _export(conn, cur)
            if exported is None:  # the failed export ended the transaction: a new one
                today = begin(conn, cur, zone, session)
            found = catalog(conn, cur, schema, list(contract.tables))
            shapes = {
                n: _shape(f"{schema}.{n}", s, found.get(n)) for n, s in contract.tables.items()
            }
            scope = Scope(schema, contract, as_of, today, zone, entity_key)
            tables = _tables(scope, found, shapes, history_days or {}, db.hashes_records(conn))
            indexes = unique_indexes(conn, cur, schema, list(tables))
            for name, table in tables.items():
                tables[name] = replace(
                    table,
                    counters=counters.get(name),
                    kept=(kept or {}).get(name),
                    proven=_proven(table.spec, indexes.get(name, [])),
                )
            relations = [
                _relation_check(r, tables, schema, zone, counts or {})
                for r in contract.relations
                if {r.table, r.join} <= tables.keys()
            ]
            snapshot = _Snapshot(url, schema, exported, session)
            outcome = _measure_all(conn, cur, snapshot, [*tables.values(), *relations])
            measured = dict(zip(tables, outcome, strict=False))
            counted = [
                _recounted(conn, cur, check, measured, c)
                for check, c in zip(relations, outcome[len(tables) :], strict=True)
            ]
    finally:
        conn.close()
    return _observation(
        contract, shapes, tables, measured, list(zip(relations, counted, strict=True))
    )


def _relation_check(
    rel: Relation,
    tables: Mapping[str, TableChecks],
    schema: str,
    zone: str,
    counts: Mapping[str, KeptCount],
) -> RelationCheck:
    """The check of ``rel``: over the pairs with a row from a day read tonight when both
    tables are to be read from a day on (their counters hold) and its count was kept."""
    check = RelationCheck(rel, schema, zone)
    mine, theirs = tables[rel.table], tables[rel.join]
    starts = (mine.unchanged_before, theirs.unchanged_before)
    if mine.axis is None or theirs.axis is None or starts[0] is None or starts[1] is None:
        return check
    return replace(
        check,
        axes=(mine.axis, theirs.axis),
        starts=(starts[0], starts[1]),
        kept=counts.get(rel.name),
    )


def _recounted(
    conn: Any,
    cur: Any,
    check: RelationCheck,
    measured: Mapping[str, Mapping[str, Any]],
    counted: Counted,
) -> Counted:
    """``counted``, or the relation counted over the whole tables when it counted from days
    on that either table's scan did not prove (it read every day after all)."""
    if counted.starts is None:
        return counted
    tables = (check.rel.table, check.rel.join)
    read = [getattr(measured[t].get("kept"), "read_from", None) for t in tables]
    if read == list(counted.starts):
        return counted
    return replace(check, starts=None).measure(conn, cur)


def _tables(
    scope: Scope,
    found: Mapping[str, Mapping[str, str]],
    shapes: Mapping[str, list[CheckResult]],
    history_days: Mapping[str, int],
    record_hash: bool,
) -> dict[str, TableChecks]:
    """The checks of each table whose shape matches (no failure in ``shapes``), given its
    columns' types in ``found``; references are checked to such tables only."""
    tables: dict[str, TableChecks] = {}
    for name, spec in scope.contract.tables.items():
        if shapes[name]:
            continue
        axis = None
        if spec.date_column is not None:
            axis = Axis(spec.date_column, _DAY_KINDS[found[name][spec.date_column]])
        tables[name] = TableChecks(
            scope,
            name,
            spec,
            axis,
            floats=tuple(c for c in spec.columns if found[name][c] in FLOATING),
            history_days=history_days.get(name, 0),
            column_types=found[name],
            record_hash=record_hash,
        )
    for name, checked in tables.items():
        refs = tuple(
            c
            for c, declared in checked.spec.columns.items()
            if declared.referenced is not None and declared.referenced[0] in tables
        )
        tables[name] = replace(checked, references=refs)
    return tables


def _proven(spec: TableSpec, indexes: Sequence[tuple[str, frozenset[str]]]) -> dict[int, str]:
    """The unique keys of ``spec`` (by position) that a unique index proves: one whose
    columns, all NOT NULL, are among the key's (rows unique on fewer columns are unique on
    more)."""
    proven = {}
    for j, key in enumerate(spec.unique):
        for index, columns in sorted(indexes):
            if columns <= set(key):
                proven[j] = index
                break
    return proven


def _observation(
    contract: Contract,
    shapes: Mapping[str, list[CheckResult]],
    tables: Mapping[str, TableChecks],
    measured: Mapping[str, Mapping[str, Any]],
    relations: Sequence[tuple[RelationCheck, Counted]],
) -> Observation:
    """The results in the contract's order of tables (each table's shape failures, then its
    checks), then the relations'; and the rows and content per day of each dated table
    whose days were measured, and what to keep for the next night. ``measured`` holds each
    table's measurements, ``relations`` each relation's count."""
    results: list[CheckResult] = []
    days: dict[str, dict[date, tuple[int, str]]] = {}
    kept: dict[str, Kept] = {}
    for name in contract.tables:
        results += shapes[name]
        table = tables.get(name)
        if table is None:
            continue
        results += table.results(measured[name])
        if table.axis is not None and not isinstance(measured[name].get("days"), Failure):
            days[name] = dict(measured[name]["days"])
        if "kept" in measured[name]:
            kept[name] = measured[name]["kept"]
    results += [check.result(counted) for check, counted in relations]
    counts = {
        check.rel.name: KeptCount(counted.shape, counted.broken)
        for check, counted in relations
        if isinstance(counted.broken, int)
    }
    return Observation(results, days, kept, counts)


CHECK_CONNECTIONS = 2  # the source checks' queries run over this many connections at once


def _export(conn: Any, cur: Any) -> str | None:
    """The transaction's snapshot, exported for other connections to import; None when the
    server refuses (then the transaction is rolled back)."""
    try:
        cur.execute("SELECT pg_export_snapshot()")  # not from a savepoint: PostgreSQL refuses
        return str(cur.fetchone()[0])
    except psycopg2.Error as exc:
        raise_if_lost(conn, exc)
        log.info("source checks on one connection: no exported snapshot (%s)", first_line(exc))
        conn.rollback()
        return None


@dataclass(frozen=True)
class _Snapshot:
    """The snapshot the checks read, and how another connection joins it: the warehouse,
    the schema of the relations, the snapshot exported by the first connection (None: not
    exported) and the PostgreSQL settings of each connection."""

    url: str
    schema: str
    exported: str | None
    session: Mapping[str, str] | None = None


def _measure_all(
    conn: Any, cur: Any, snapshot: _Snapshot, work: Sequence[TableChecks | RelationCheck]
) -> list[Any]:
    """Each table's measurements and each relation's result, in the order of ``work``, over
    up to ``CHECK_CONNECTIONS`` connections that share the first one's exported snapshot
    (imported): every check sees the same data. Without one, one connection does all."""

    def one(c: Any, k: Any, item: TableChecks | RelationCheck) -> Any:
        return item.measure(c, k)

    if snapshot.exported is None or len(work) < 2 or CHECK_CONNECTIONS < 2:
        return [one(conn, cur, item) for item in work]
    fault_point("source_snapshot_exported")  # tests write to the warehouse here

    pending: queue.SimpleQueue[tuple[int, TableChecks | RelationCheck]] = queue.SimpleQueue()
    for i, item in enumerate(work):
        pending.put((i, item))
    done: list[Any] = [None] * len(work)

    def drain(c: Any, k: Any) -> None:
        while True:
            try:
                i, item = pending.get_nowait()
            except queue.Empty:
                return
            done[i] = one(c, k, item)

    def helper() -> None:
        try:
            other = db.connect(snapshot.url)
        except SourceError:
            return  # the first connection does the rest
        try:
            with other.cursor() as k:
                try:
                    k.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    k.execute("SET TRANSACTION SNAPSHOT %s", (snapshot.exported,))
                    settle(k, snapshot.session)
                except psycopg2.Error as exc:
                    log.info("a source check connection cannot share the snapshot: %s", exc)
                    return
                drain(other, k)
        finally:
            other.close()

    with ThreadPoolExecutor(CHECK_CONNECTIONS - 1) as pool:
        helpers = [pool.submit(helper) for _ in range(CHECK_CONNECTIONS - 1)]
        drain(conn, cur)
        for h in helpers:
            h.result()  # a lost connection (SourceError) is raised here
    return done


def waiting_for(
    url: str, schema: str, contract: Contract, as_of: date, timezone: str = "UTC"
) -> list[str]:
    """What the night of ``as_of`` still waits for: one line per ``fresh`` table whose rows
    do not yet reach the day before ``as_of``; empty once the data has landed.

    A missing or misshapen table, or one whose query fails, is not waited for:
    ``check_sources`` reports it as a failed check at once.
    """
    as_of = as_day(as_of)
    zone = contract.timezone or timezone
    fresh = {n: s for n, s in contract.tables.items() if s.fresh and s.date_column}
    if not fresh:
        return []
    waiting = []
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            scope = Scope(schema, contract, as_of, begin(conn, cur, zone), zone)
            found = catalog(conn, cur, schema, list(fresh))
            for name, spec in fresh.items():
                if _shape(f"{schema}.{name}", spec, found.get(name)):
                    continue
                assert spec.date_column is not None
                axis = Axis(spec.date_column, _DAY_KINDS[found[name][spec.date_column]])
                table = TableChecks(scope, name, spec, axis)
                latest = table.measure_one(conn, cur, "latest", table.params)
                if isinstance(latest, Failure) or (latest and as_day(latest) >= table.last_day):
                    continue
                waiting.append(
                    f"{table.target}.{spec.date_column}: rows through {table.last_day} expected, "
                    f"latest {latest or 'none'}"
                )
    finally:
        conn.close()
    return waiting


def history_start(
    url: str, schema: str, contract: Contract, before: date, timezone: str = "UTC"
) -> date | None:
    """The earliest day of any row dated strictly before ``before``, across the tables
    of ``contract`` that have a date column (days in the contract's time zone, else
    ``timezone``).

    Returns:
        That day, or None when no table has a date column or none has a row before
        ``before``.

    Raises:
        SourceError: a dated table or its date column is missing or not a date or
            timestamp, its query failed, or the warehouse is unreachable.
        ConfigError: PostgreSQL does not know the time zone.
    """
    starts = [d for d in table_starts(url, schema, contract, before, timezone).values() if d]
    return min(starts) if starts else None


def table_starts(
    url: str, schema: str, contract: Contract, before: date, timezone: str = "UTC"
) -> dict[str, date | None]:
    """Per dated table of ``contract``, the earliest day of its rows dated before ``before``
    (None for a table with no such row). Same rules and errors as :func:`history_start`."""
    names = dated_tables(contract)
    if not names:
        return {}
    before = as_day(before)
    zone = contract.timezone or timezone
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            begin(conn, cur, zone)
            found = catalog(conn, cur, schema, names)
            parts = []
            for name in names:
                column = contract.tables[name].date_column
                assert column is not None
                data_type = found.get(name, {}).get(column)
                if data_type not in _DAY_KINDS:
                    raise SourceError(
                        f"{schema}.{name}.{column}: expected a date, timestamp or timestamptz "
                        f"column, found {data_type or 'no such table or column'}; run the "
                        "source checks for details"
                    )
                axis = Axis(column, _DAY_KINDS[data_type])
                parts.append(
                    sql.SQL("(SELECT {}, {} FROM {} WHERE {})").format(
                        sql.Literal(name),
                        axis.day(sql.SQL("min({})").format(sql.Identifier(column))),
                        sql.Identifier(schema, name),
                        axis.before("end"),
                    )
                )
            query = sql.SQL(" UNION ALL ").join(parts)
            try:
                rows = run_query(conn, cur, query, {"tz": zone, "end": before})
            except QueryFailed as exc:
                raise SourceError(
                    f"cannot find the start of the history in schema {schema!r}: {exc.message}"
                ) from exc
    finally:
        conn.close()
    return {str(name): None if day is None else db.to_date(day) for name, day in rows}
