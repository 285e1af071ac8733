"""Reading a warehouse for the source checks: one read-only snapshot, each query in a
savepoint, the catalog's column types and the day of a row.

A query PostgreSQL rejects (a bad rule, a permission denied, a statement timeout) is a
``QueryFailed`` that leaves the transaction usable, and a check turns it into a
``Failure``: a failed check naming the first line of the error (``judge``). A lost
connection raises ``SourceError`` instead, and a time zone PostgreSQL does not know,
``ConfigError``. ``Axis`` computes the day of a row from its date column and bounds the
raw column with values of its own type, so an index on the column serves the range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg2
from psycopg2 import sql

from pipeline.core.errors import ConfigError, SourceError
from pipeline.stages.checks import CheckResult
from pipeline.store import db

STAGE = "sources"
_QUERY_CANCELED = "57014"  # statement_timeout or a cancel request
FLOATING = {"numeric", "real", "double precision"}  # data_types whose values may be NaN


@dataclass(frozen=True)
class Failure:
    """A check's query failed; ``message`` is the first line of the PostgreSQL error."""

    message: str


class QueryFailed(Exception):
    """PostgreSQL rejected a query (``timed_out``: it was canceled, by a statement timeout
    or a cancel request); the transaction is usable again."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.message = message
        self.timed_out = timed_out


def first_line(exc: psycopg2.Error) -> str:
    primary = exc.diag.message_primary
    if primary:
        return str(primary)
    text = str(exc).strip()
    return text.splitlines()[0] if text else f"SQLSTATE {exc.pgcode}"


def raise_if_lost(conn: Any, exc: psycopg2.Error) -> None:
    """A SourceError when ``exc`` means the connection is gone (not a rejected query)."""
    if conn.closed or not exc.pgcode or exc.pgcode.startswith(("08", "57P")):
        raise SourceError(
            f"lost the warehouse connection while checking sources: {first_line(exc)}; "
            "check that the server is up and re-run the date"
        ) from exc


def run_query(conn: Any, cur: Any, query: sql.Composable, params: Mapping[str, Any]) -> list[Any]:
    """Rows of ``query`` run inside a savepoint, so that its failure aborts nothing else.

    Raises:
        QueryFailed: PostgreSQL rejected the query; the transaction is usable again.
        SourceError: the connection was lost.
    """
    cur.execute("SAVEPOINT nightscore_source_check")
    try:
        cur.execute(query, params)
        rows = list(cur.fetchall())
    except psycopg2.Error as exc:
        raise_if_lost(conn, exc)
        cur.execute("ROLLBACK TO SAVEPOINT nightscore_source_check")
        raise QueryFailed(first_line(exc), exc.pgcode == _QUERY_CANCELED) from exc
    cur.execute("RELEASE SAVEPOINT nightscore_source_check")
    return rows


def begin(conn: Any, cur: Any, timezone: str, session: Mapping[str, str] | None = None) -> date:
    """Start a read-only snapshot (rules are SQL text: they must not write) with the
    settings ``session``, and return today in ``timezone`` from the server's clock.

    Raises:
        ConfigError: PostgreSQL does not know ``timezone``.
    """
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    settle(cur, session)
    try:
        rows = run_query(
            conn, cur, sql.SQL("SELECT CAST(now() AT TIME ZONE %(tz)s AS date)"), {"tz": timezone}
        )
    except QueryFailed as exc:
        raise ConfigError(
            f"time zone {timezone!r} (the contract's timezone, else the caller's): expected a "
            f"name PostgreSQL knows (pg_timezone_names) such as UTC or America/New_York, "
            f"found {exc.message}"
        ) from exc
    return date.fromisoformat(str(rows[0][0]))


def settle(cur: Any, session: Mapping[str, str] | None) -> None:
    """The transaction's PostgreSQL settings.

    Raises:
        ConfigError: PostgreSQL refuses a name or a value.
    """
    for name, value in (session or {}).items():
        try:
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        except psycopg2.Error as exc:
            raise db.refused_setting("warehouse.session", name, value, first_line(exc)) from exc


# information_schema.columns.data_type, computed from pg_catalog: information_schema
# hides tables the user may not read, which would turn "permission denied" into "no such
# table".
_CATALOG = sql.SQL(
    """
    SELECT c.relname, a.attname,
           CASE WHEN t.typtype = 'd' THEN
                CASE WHEN bt.typelem <> 0 AND bt.typlen = -1 THEN 'ARRAY'
                     WHEN nbt.nspname = 'pg_catalog' THEN format_type(t.typbasetype, NULL)
                     ELSE 'USER-DEFINED' END
                ELSE
                CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN 'ARRAY'
                     WHEN nt.nspname = 'pg_catalog' THEN format_type(a.atttypid, NULL)
                     ELSE 'USER-DEFINED' END
           END
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_type t ON t.oid = a.atttypid
    JOIN pg_namespace nt ON nt.oid = t.typnamespace
    LEFT JOIN (pg_type bt JOIN pg_namespace nbt ON nbt.oid = bt.typnamespace)
           ON t.typtype = 'd' AND t.typbasetype = bt.oid
    WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
      AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped
    """
)


def catalog(conn: Any, cur: Any, schema: str, tables: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per table of ``schema`` (among ``tables``), its columns and their data_type."""
    found: dict[str, dict[str, str]] = {}
    try:
        rows = run_query(conn, cur, _CATALOG, {"schema": schema, "tables": list(tables)})
    except QueryFailed as exc:
        raise SourceError(f"cannot read the catalog of schema {schema!r}: {exc.message}") from exc
    for table, column, data_type in rows:
        found.setdefault(table, {})[column] = data_type
    return found


# Unique indexes whose key columns are all NOT NULL: valid, ready, neither partial nor on
# expressions; their key columns only (not INCLUDE columns).
_UNIQUE_INDEXES = sql.SQL(
    """
    SELECT c.relname, x.relname, array_agg(a.attname::text)
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indrelid
    JOIN pg_class x ON x.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN LATERAL unnest(CAST(i.indkey AS int2[])) WITH ORDINALITY AS k(attnum, pos)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND c.relkind IN ('r', 'p')
      AND i.indisunique AND i.indisvalid AND i.indisready AND i.indislive
      AND i.indpred IS NULL AND i.indexprs IS NULL AND k.pos <= i.indnkeyatts
    GROUP BY c.relname, x.relname
    HAVING bool_and(a.attnotnull)
    """
)


def unique_indexes(
    conn: Any, cur: Any, schema: str, tables: Sequence[str]
) -> dict[str, list[tuple[str, frozenset[str]]]]:
    """Per table of ``schema`` (among ``tables``), its unique indexes on NOT NULL columns
    (name, key columns): each proves that no two rows share those columns. Empty when the
    catalog cannot be read."""
    try:
        rows = run_query(conn, cur, _UNIQUE_INDEXES, {"schema": schema, "tables": list(tables)})
    except QueryFailed:
        return {}
    found: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for table, index, columns in rows:
        found.setdefault(table, []).append((index, frozenset(columns)))
    return found


@dataclass(frozen=True)
class Axis:
    """The date column of a table: how to compute a row's day and bound the raw column."""

    column: str
    kind: str  # date | timestamp | timestamptz

    def day(self, expr: sql.Composable) -> sql.Composable:
        if self.kind == "date":
            return expr
        if self.kind == "timestamp":
            return sql.SQL("CAST({} AS date)").format(expr)
        return sql.SQL("CAST({} AT TIME ZONE {} AS date)").format(expr, sql.Placeholder("tz"))

    def bound(self, name: str) -> sql.Composable:
        """The start of the day bound to parameter ``name``, in the column's own type."""
        day = sql.SQL("CAST({} AS date)").format(sql.Placeholder(name))
        if self.kind == "date":
            return day
        if self.kind == "timestamp":
            return sql.SQL("CAST({} AS timestamp)").format(day)
        return sql.SQL("(CAST({} AS timestamp) AT TIME ZONE {})").format(day, sql.Placeholder("tz"))

    def since(self, name: str) -> sql.Composable:
        return sql.SQL("{} >= {}").format(sql.Identifier(self.column), self.bound(name))

    def before(self, name: str) -> sql.Composable:
        return sql.SQL("{} < {}").format(sql.Identifier(self.column), self.bound(name))


def judge(
    check: str,
    target: str,
    expected: str,
    measured: Any,
    verdict: Callable[[Any], tuple[bool, str]],
) -> CheckResult:
    """The result of one check: ``verdict(measured)``, or a failed check when its query
    failed (``measured`` is a ``Failure``)."""
    if isinstance(measured, Failure):
        return CheckResult(
            STAGE, check, target, False, expected, f"the check's query failed: {measured.message}"
        )
    passed, found = verdict(measured)
    return CheckResult(STAGE, check, target, passed, expected, found)


def as_day(value: date) -> date:
    """A date, also when given a datetime (whose time of day is ignored)."""
    return value.date() if isinstance(value, datetime) else value
