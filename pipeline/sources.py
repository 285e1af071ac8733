"""Source contracts: the warehouse tables a use case reads, declared in YAML and checked
before featurizing.

A contract (``usecases/<name>/contract.yaml``) names each table, its columns and their
types, the column that dates a row, and the checks to run on it: freshness, daily
volume, value rules, unique keys and null fractions. ``check_sources`` turns a contract
into ``CheckResult`` values for the gate in ``pipeline.checks``; the code holds no table
or column name of any warehouse.

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
import math
import queue
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any

import psycopg2
from psycopg2 import sql

from pipeline import db
from pipeline.checks import CheckResult
from pipeline.contract import (
    _DAY_KINDS,
    Contract,
    Relation,
    TableSpec,
    VolumeSpec,
    dated_tables,
)
from pipeline.errors import ConfigError, SourceError
from pipeline.faults import fault_point
from pipeline.figures import percent, within

log = logging.getLogger(__name__)

STAGE = "sources"
_QUERY_CANCELED = "57014"  # statement_timeout or a cancel request

# -- checking a warehouse ----------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """A check's query failed; ``message`` is the first line of the PostgreSQL error."""

    message: str


class _QueryFailed(Exception):
    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.message = message
        self.timed_out = timed_out


def _first_line(exc: psycopg2.Error) -> str:
    primary = exc.diag.message_primary
    if primary:
        return str(primary)
    text = str(exc).strip()
    return text.splitlines()[0] if text else f"SQLSTATE {exc.pgcode}"


def _raise_if_lost(conn: Any, exc: psycopg2.Error) -> None:
    """A SourceError when ``exc`` means the connection is gone (not a rejected query)."""
    if conn.closed or not exc.pgcode or exc.pgcode.startswith(("08", "57P")):
        raise SourceError(
            f"lost the warehouse connection while checking sources: {_first_line(exc)}; "
            "check that the server is up and re-run the date"
        ) from exc


def _run(conn: Any, cur: Any, query: sql.Composable, params: Mapping[str, Any]) -> list[Any]:
    """Rows of ``query`` run inside a savepoint, so that its failure aborts nothing else.

    Raises:
        _QueryFailed: PostgreSQL rejected the query; the transaction is usable again.
        SourceError: the connection was lost.
    """
    cur.execute("SAVEPOINT nightscore_source_check")
    try:
        cur.execute(query, params)
        rows = list(cur.fetchall())
    except psycopg2.Error as exc:
        _raise_if_lost(conn, exc)
        cur.execute("ROLLBACK TO SAVEPOINT nightscore_source_check")
        raise _QueryFailed(_first_line(exc), exc.pgcode == _QUERY_CANCELED) from exc
    cur.execute("RELEASE SAVEPOINT nightscore_source_check")
    return rows


def _begin(conn: Any, cur: Any, timezone: str) -> date:
    """Start a read-only snapshot (rules are SQL text: they must not write) and return
    today in ``timezone`` from the server's clock.

    Raises:
        ConfigError: PostgreSQL does not know ``timezone``.
    """
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        rows = _run(
            conn, cur, sql.SQL("SELECT CAST(now() AT TIME ZONE %(tz)s AS date)"), {"tz": timezone}
        )
    except _QueryFailed as exc:
        raise ConfigError(
            f"time zone {timezone!r} (the contract's timezone, else the caller's): expected a "
            f"name PostgreSQL knows (pg_timezone_names) such as UTC or America/New_York, "
            f"found {exc.message}"
        ) from exc
    return date.fromisoformat(str(rows[0][0]))


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


def _catalog(conn: Any, cur: Any, schema: str, tables: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per table of ``schema`` (among ``tables``), its columns and their data_type."""
    found: dict[str, dict[str, str]] = {}
    try:
        rows = _run(conn, cur, _CATALOG, {"schema": schema, "tables": list(tables)})
    except _QueryFailed as exc:
        raise SourceError(f"cannot read the catalog of schema {schema!r}: {exc.message}") from exc
    for table, column, data_type in rows:
        found.setdefault(table, {})[column] = data_type
    return found


@dataclass(frozen=True)
class _Axis:
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


_Reader = Callable[[list[Any]], dict[str, Any]]
_LOOK_UP = object()  # the newest day before D lies outside the scanned range


@dataclass(frozen=True)
class _Table:
    """The checks of one source table whose shape matches its contract."""

    schema: str
    name: str
    spec: TableSpec
    contract: Contract
    axis: _Axis | None
    as_of: date
    today: date
    timezone: str
    entity_key: str | None = None
    floats: tuple[str, ...] = ()  # declared columns stored as numeric, real or double

    @property
    def future_from(self) -> date:
        """Rows dated on or after this day are in the future: the run date itself for a
        run of today (or later), else tomorrow (a backfill sees later facts rightly)."""
        return self.as_of if self.as_of >= self.today else self.today + timedelta(days=1)

    @property
    def target(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def relation(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def last_day(self) -> date:
        return self.as_of - timedelta(days=1)

    @property
    def window_start(self) -> date:
        return self.as_of - timedelta(days=self.contract.window_days)

    @property
    def volume_start(self) -> date:
        days = self.spec.volume.trailing_days if self.spec.volume else 0
        return self.last_day - timedelta(days=days)

    @property
    def params(self) -> dict[str, Any]:
        future = self.future_from
        return {
            "tz": self.timezone,
            "end": self.as_of,
            "start": self.window_start,
            "volume_start": self.volume_start,
            "tomorrow": future,
            # one range scan covers the window, the volume days and every future row
            "scan_start": min(self.window_start, self.volume_start, future),
            # days from here on are all in the future: one group is enough to count them
            "cap": max(self.as_of, future),
        }

    # -- the SQL pieces

    def _rule(self, rule: str) -> sql.Composable:
        # psycopg2 formats the whole text with the parameters, so a literal % is doubled;
        # the newline ends a trailing -- comment of the rule before the query goes on.
        return sql.SQL("NOT ({}\n)").format(sql.SQL(rule.replace("%", "%%")))

    def _in_window(self) -> sql.Composable:
        if self.axis is None:
            return sql.SQL("TRUE")
        return sql.SQL("{} AND {}").format(self.axis.since("start"), self.axis.before("end"))

    def _distinct(self, key: tuple[str, ...]) -> sql.Composable:
        """Distinct keys, a NULL being a value like any other."""
        if len(key) == 1:
            col = sql.Identifier(key[0])
            return sql.SQL(
                "count(DISTINCT {col}) + CASE WHEN count(*) > count({col}) THEN 1 ELSE 0 END"
            ).format(col=col)
        return sql.SQL("count(DISTINCT ROW({}))").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in key)
        )

    def _nonfinite(self, column: str) -> sql.Composable:
        # NaN = NaN in PostgreSQL, and numeric stores NaN and +-Infinity as well
        return sql.SQL("CAST({} AS double precision) IN ('NaN', 'Infinity', '-Infinity')").format(
            sql.Identifier(column)
        )

    def _keys(self) -> list[str]:
        keys = []
        if self.axis is not None:
            keys.append("future")
            if self.spec.fresh:
                keys.append("latest")
            if self.spec.volume is not None:
                keys.append("volume")
            keys.append("days")
        keys += [f"rule:{i}" for i in range(len(self.spec.rules))]
        keys += [f"unique:{j}" for j in range(len(self.spec.unique))]
        keys += [f"null:{c}" for c in self.spec.columns]
        keys += [f"finite:{c}" for c in self.floats]
        return keys

    def probe(self, key: str) -> tuple[sql.Composable, Callable[[list[Any]], Any]]:
        """One check's own query and how to read its rows."""
        kind, _, arg = key.partition(":")
        t = self.relation
        if kind == "rule":
            return (
                sql.SQL("SELECT count(*) FROM {} WHERE {} AND {}").format(
                    t, self._in_window(), self._rule(self.spec.rules[int(arg)])
                ),
                lambda rows: int(rows[0][0]),
            )
        if kind == "unique":
            return (
                sql.SQL("SELECT count(*) - ({}) FROM {}").format(
                    self._distinct(self.spec.unique[int(arg)]), t
                ),
                lambda rows: int(rows[0][0]),
            )
        if kind == "null":
            return (
                sql.SQL("SELECT count(*), count({}) FROM {} WHERE {}").format(
                    sql.Identifier(arg), t, self._in_window()
                ),
                lambda rows: (int(rows[0][0]), int(rows[0][1])),
            )
        if kind == "finite":
            return (
                sql.SQL("SELECT count(*) FROM {} WHERE {} AND {}").format(
                    t, self._in_window(), self._nonfinite(arg)
                ),
                lambda rows: int(rows[0][0]),
            )
        assert self.axis is not None
        col = sql.Identifier(self.axis.column)
        if kind == "days":
            kind = "volume"
        if kind == "future":
            return (
                sql.SQL("SELECT count(*) FROM {} WHERE {}").format(t, self.axis.since("tomorrow")),
                lambda rows: int(rows[0][0]),
            )
        if kind == "latest":
            return (
                sql.SQL("SELECT {} FROM {} WHERE {}").format(
                    self.axis.day(sql.SQL("max({})").format(col)), t, self.axis.before("end")
                ),
                lambda rows: rows[0][0],
            )
        return (
            sql.SQL("SELECT {}, count(*) FROM {} WHERE {} AND {} GROUP BY 1").format(
                self.axis.day(col), t, self.axis.since("scan_start"), self.axis.before("end")
            ),
            lambda rows: {day: int(n) for day, n in rows},
        )

    def fast_queries(self) -> list[tuple[list[str], sql.Composable, _Reader]]:
        """The few queries that measure every check of the table at once."""
        t = self.relation
        spec = self.spec
        nulls = [sql.SQL("count({})").format(sql.Identifier(c)) for c in spec.columns]
        rules = [sql.SQL("count(*) FILTER (WHERE {})").format(self._rule(r)) for r in spec.rules]
        rules += [
            sql.SQL("count(*) FILTER (WHERE {})").format(self._nonfinite(c)) for c in self.floats
        ]
        uniques = [self._distinct(key) for key in spec.unique]
        unique_keys = [f"unique:{j}" for j in range(len(spec.unique))]
        if self.axis is None:
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join([sql.SQL("count(*)"), *nulls, *rules, *uniques]), t
            )
            return [(self._keys(), query, self._read_whole)]
        day = sql.SQL("LEAST({}, CAST({} AS date))").format(
            self.axis.day(sql.Identifier(self.axis.column)), sql.Placeholder("cap")
        )
        grouped = sql.SQL("SELECT {} FROM {} WHERE {} GROUP BY 1").format(
            sql.SQL(", ").join([day, sql.SQL("count(*)"), *nulls, *rules]),
            t,
            self.axis.since("scan_start"),
        )
        out: list[tuple[list[str], sql.Composable, _Reader]] = [
            (
                [k for k in self._keys() if not k.startswith("unique:")],
                grouped,
                self._read_days,
            )
        ]
        if uniques:
            query = sql.SQL("SELECT count(*), {} FROM {}").format(sql.SQL(", ").join(uniques), t)
            out.append((unique_keys, query, self._read_uniques))
        return out

    def _read_whole(self, rows: list[Any]) -> dict[str, Any]:
        total, *rest = rows[0]
        ncols, nrules = len(self.spec.columns), len(self.spec.rules)
        out: dict[str, Any] = {
            f"null:{c}": (int(total), int(n))
            for c, n in zip(self.spec.columns, rest[:ncols], strict=True)
        }
        out |= {f"rule:{i}": int(n) for i, n in enumerate(rest[ncols : ncols + nrules])}
        nfin = len(self.floats)
        finite = rest[ncols + nrules : ncols + nrules + nfin]
        out |= {f"finite:{c}": int(n) for c, n in zip(self.floats, finite, strict=True)}
        out |= self._read_uniques([(total, *rest[ncols + nrules + nfin :])])
        return out

    def _read_uniques(self, rows: list[Any]) -> dict[str, Any]:
        total, *distinct = rows[0]
        return {f"unique:{j}": int(total) - int(d) for j, d in enumerate(distinct)}

    def _read_days(self, rows: list[Any]) -> dict[str, Any]:
        ncols = len(self.spec.columns)
        future = total = 0
        nonnull = [0] * ncols
        bad = [0] * (len(self.spec.rules) + len(self.floats))
        counts: dict[date, int] = {}
        for day, n, *rest in rows:
            if day >= self.future_from:
                future += n
            if day < self.as_of:
                counts[day] = n
                if day >= self.window_start:
                    total += n
                    nonnull = [a + b for a, b in zip(nonnull, rest[:ncols], strict=True)]
                    bad = [a + b for a, b in zip(bad, rest[ncols:], strict=True)]
        out: dict[str, Any] = {"future": future, "volume": counts, "days": counts}
        out["latest"] = max(counts) if counts else _LOOK_UP
        out |= {f"null:{c}": (total, n) for c, n in zip(self.spec.columns, nonnull, strict=True)}
        nrules = len(self.spec.rules)
        out |= {f"rule:{i}": n for i, n in enumerate(bad[:nrules])}
        out |= {f"finite:{c}": n for c, n in zip(self.floats, bad[nrules:], strict=True)}
        return out

    # -- running and judging

    def measure(self, conn: Any, cur: Any) -> dict[str, Any]:
        """Every check's measurement, or a ``_Failure`` when its query failed.

        The fast queries come first; when one fails, each of its checks runs its own
        query so that the failure is pinned on the check (and column) that caused it. A
        timeout is not retried check by check: it would cost one timeout per check.
        """
        params = self.params
        out: dict[str, Any] = {}
        for keys, query, read in self.fast_queries():
            try:
                measured = read(_run(conn, cur, query, params))
                out |= {k: measured[k] for k in keys}
            except _QueryFailed as exc:
                if exc.timed_out:
                    out |= {k: _Failure(exc.message) for k in keys}
                    continue
                log.info("%s: %s; running its checks one by one", self.target, exc.message)
                for key in keys:
                    out[key] = self._probe(conn, cur, key, params)
        if out.get("latest") is _LOOK_UP:
            out["latest"] = self._probe(conn, cur, "latest", params)
        return out

    def _probe(self, conn: Any, cur: Any, key: str, params: Mapping[str, Any]) -> Any:
        query, read = self.probe(key)
        try:
            return read(_run(conn, cur, query, params))
        except _QueryFailed as exc:
            return _Failure(exc.message)

    def results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        """The checks of the table, in the order: future rows, freshness, volume, value
        rules, unique keys, then null fractions (failures only)."""
        out: list[CheckResult] = []
        t = self.target
        if self.axis is not None:
            dated = f"{t}.{self.axis.column}"
            out.append(
                _judge(
                    "no_future_rows",
                    dated,
                    f"0 rows dated on or after {self.future_from}",
                    measured["future"],
                    lambda n: (n == 0, f"{n} rows"),
                )
            )
            if self.spec.fresh:
                out.append(
                    _judge(
                        "fresh_through",
                        dated,
                        f"rows through {self.last_day}",
                        measured["latest"],
                        lambda latest: (
                            latest == self.last_day,
                            f"latest {latest}" if latest else f"no rows dated before {self.as_of}",
                        ),
                    )
                )
            if self.spec.volume is not None:
                vol = self.spec.volume
                out.append(
                    _judge(
                        "daily_volume",
                        f"{t} on {self.last_day}",
                        f"{vol.min_ratio}..{vol.max_ratio} x the trailing "
                        f"{vol.trailing_days}-day median",
                        measured["volume"],
                        lambda counts: self._volume(counts, vol),
                    )
                )
                out.append(
                    _judge(
                        "days_complete",
                        dated,
                        f"every day {self.window_start}..{self.last_day - timedelta(days=1)} within "
                        f"{vol.min_ratio}..{vol.max_ratio} x the median day",
                        measured["volume"],
                        lambda counts: self._complete(counts, vol),
                    )
                )
        scope = (
            f"every row dated {self.window_start}..{self.last_day}"
            if self.axis is not None
            else "every row"
        )
        for i, rule in enumerate(self.spec.rules):
            out.append(
                _judge(
                    "value_rule",
                    t,
                    f"{scope} has {rule}",
                    measured[f"rule:{i}"],
                    lambda bad: (bad == 0, f"{bad} rows violate it"),
                )
            )
        for j, key in enumerate(self.spec.unique):
            label = key[0] if len(key) == 1 else f"({', '.join(key)})"
            out.append(
                _judge(
                    "unique_key",
                    f"{t}.{label}",
                    "one row per key",
                    measured[f"unique:{j}"],
                    lambda dupes: (dupes == 0, f"{dupes} duplicate rows"),
                )
            )
        where = (
            f"in the last {self.contract.window_days} days"
            if self.axis is not None
            else "in the whole table"
        )
        for column in self.floats:
            result = _judge(
                "finite",
                f"{t}.{column}",
                f"no NaN or infinite values in {scope.removeprefix('every ')}",
                measured[f"finite:{column}"],
                lambda bad: (bad == 0, f"{bad} rows NaN or infinite"),
            )
            if not result.passed:
                out.append(result)
        for column in self.spec.columns:
            limit = self.contract.null_limit(self.name, column, self.entity_key)
            result = _judge(
                "null_fraction",
                f"{t}.{column}",
                f"<= {limit * 100:g}% nulls",
                measured[f"null:{column}"],
                partial(_null_verdict, limit=limit, where=where),
            )
            if not result.passed:
                out.append(result)
        return out

    def _complete(self, counts: Mapping[date, int], vol: VolumeSpec) -> tuple[bool, str]:
        """Every day of the window has rows, within the volume ratios of the window's median
        day, or of its weekday's median (a day shifted by a time zone bug leaves a gap and a
        double)."""
        # the last day has its own check against the trailing median (daily_volume)
        days = [self.window_start + timedelta(days=i) for i in range(self.contract.window_days - 1)]
        odd = []
        medians = []
        for d in days:
            peers = [p for p in days if not vol.weekly or p.weekday() == d.weekday()]
            median = float(statistics.median([counts.get(p, 0) for p in peers]))
            medians.append(median)
            n = counts.get(d, 0)
            ratio = n / median if median else math.inf
            if not vol.min_ratio <= ratio <= vol.max_ratio:
                odd.append(f"{d}: {n:,} rows ({within(ratio, vol.min_ratio, vol.max_ratio)} x)")
        typical = statistics.median(medians)
        if not odd:
            return True, f"{len(days)} days, median {typical:,.0f} rows"
        shown = "; ".join(odd[:5]) + (f"; and {len(odd) - 5} more days" if len(odd) > 5 else "")
        return False, f"median {typical:,.0f} rows a day; {shown}"

    def _volume(self, counts: Mapping[date, int], vol: VolumeSpec) -> tuple[bool, str]:
        trailing = [
            counts.get(self.last_day - timedelta(days=i), 0)
            for i in range(1, vol.trailing_days + 1)
            if not vol.weekly or i % 7 == 0
        ] or [0]
        median = float(statistics.median(trailing))
        rows = counts.get(self.last_day, 0)
        ratio = rows / median if median else math.inf
        return (
            vol.min_ratio <= ratio <= vol.max_ratio,
            f"{rows:,} rows vs a median of {median:,.0f} "
            f"({within(ratio, vol.min_ratio, vol.max_ratio)} x)",
        )


def _null_verdict(counts: tuple[int, int], limit: float, where: str) -> tuple[bool, str]:
    total, nonnull = counts
    fraction = (total - nonnull) / total if total else 0.0
    return fraction <= limit, f"{percent(fraction, limit)} nulls {where}"


def _judge(
    check: str,
    target: str,
    expected: str,
    measured: Any,
    verdict: Callable[[Any], tuple[bool, str]],
) -> CheckResult:
    if isinstance(measured, _Failure):
        return CheckResult(
            STAGE, check, target, False, expected, f"the check's query failed: {measured.message}"
        )
    passed, found = verdict(measured)
    return CheckResult(STAGE, check, target, passed, expected, found)


def _day(value: date) -> date:
    """A date, also when given a datetime (whose time of day is ignored)."""
    return value.date() if isinstance(value, datetime) else value


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
    """What the source checks found, and the rows per day each dated table held before the
    run date over the scanned days (what a later run compares to see history rewritten)."""

    results: list[CheckResult]
    days: dict[str, dict[date, int]]


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
    (the entity key and ``not_null`` columns: none at all; failures only). A table without
    a date column is checked as a whole and has no time-based checks. Then each relation
    (a rule across two joined tables).

    Days of timestamp columns are counted in ``contract.timezone``, else ``timezone``.
    All checks read one consistent, read-only snapshot.

    Returns:
        One ``CheckResult`` per check (stage ``sources``); a check whose query PostgreSQL
        rejected is a failed result whose ``found`` starts with "the check's query failed".

    Raises:
        SourceError: the warehouse is unreachable or the connection was lost.
        ConfigError: PostgreSQL does not know the time zone.
    """
    as_of = _day(as_of)
    zone = contract.timezone or timezone
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            today = _begin(conn, cur, zone)
            snapshot = _export(conn, cur)
            if snapshot is None:  # the failed export ended the transaction: a new one
                today = _begin(conn, cur, zone)
            found = _catalog(conn, cur, schema, list(contract.tables))
            shapes: dict[str, list[CheckResult]] = {}
            tables: dict[str, _Table] = {}
            for name, spec in contract.tables.items():
                shapes[name] = _shape(f"{schema}.{name}", spec, found.get(name))
                if shapes[name]:
                    continue
                axis = None
                if spec.date_column is not None:
                    axis = _Axis(spec.date_column, _DAY_KINDS[found[name][spec.date_column]])
                floats = tuple(c for c in spec.columns if found[name][c] in _FLOATING)
                tables[name] = _Table(
                    schema, name, spec, contract, axis, as_of, today, zone, entity_key, floats
                )
            relations = [r for r in contract.relations if {r.table, r.join} <= tables.keys()]
            outcome = _measure_all(url, conn, cur, schema, snapshot, [*tables.values(), *relations])
    finally:
        conn.close()
    measured = dict(zip(tables, outcome, strict=False))
    results: list[CheckResult] = []
    days: dict[str, dict[date, int]] = {}
    for name in contract.tables:
        results += shapes[name]
        table = tables.get(name)
        if table is None:
            continue
        results += table.results(measured[name])
        if table.axis is not None and not isinstance(measured[name].get("days"), _Failure):
            days[name] = dict(measured[name]["days"])
    results += outcome[len(tables) :]
    return Observation(results, days)


CHECK_CONNECTIONS = 2  # the source checks' queries run over this many connections at once


def _export(conn: Any, cur: Any) -> str | None:
    """The transaction's snapshot, exported for other connections to import; None when the
    server refuses (then the transaction is rolled back)."""
    try:
        cur.execute("SELECT pg_export_snapshot()")  # not from a savepoint: PostgreSQL refuses
        return str(cur.fetchone()[0])
    except psycopg2.Error as exc:
        _raise_if_lost(conn, exc)
        log.info("source checks on one connection: no exported snapshot (%s)", _first_line(exc))
        conn.rollback()
        return None


def _measure_all(
    url: str,
    conn: Any,
    cur: Any,
    schema: str,
    snapshot: str | None,
    work: Sequence[_Table | Relation],
) -> list[Any]:
    """Each table's measurements and each relation's result, in the order of ``work``, over
    up to ``CHECK_CONNECTIONS`` connections that share the first one's ``snapshot``
    (imported): every check sees the same data. Without a snapshot, one connection does all."""

    def one(c: Any, k: Any, item: _Table | Relation) -> Any:
        if isinstance(item, _Table):
            return item.measure(c, k)
        return _relation(c, k, schema, item)

    if snapshot is None or len(work) < 2 or CHECK_CONNECTIONS < 2:
        return [one(conn, cur, item) for item in work]
    fault_point("source_snapshot_exported")  # tests write to the warehouse here

    pending: queue.SimpleQueue[tuple[int, _Table | Relation]] = queue.SimpleQueue()
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
            other = db.connect(url)
        except SourceError:
            return  # the first connection does the rest
        try:
            with other.cursor() as k:
                try:
                    k.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    k.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
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


_FLOATING = {"numeric", "real", "double precision"}


def waiting_for(
    url: str, schema: str, contract: Contract, as_of: date, timezone: str = "UTC"
) -> list[str]:
    """What the night of ``as_of`` still waits for: one line per ``fresh`` table whose rows
    do not yet reach the day before ``as_of``; empty once the data has landed.

    A missing or misshapen table, or one whose query fails, is not waited for:
    ``check_sources`` reports it as a failed check at once.
    """
    as_of = _day(as_of)
    zone = contract.timezone or timezone
    fresh = {n: s for n, s in contract.tables.items() if s.fresh and s.date_column}
    if not fresh:
        return []
    waiting = []
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            today = _begin(conn, cur, zone)
            found = _catalog(conn, cur, schema, list(fresh))
            for name, spec in fresh.items():
                if _shape(f"{schema}.{name}", spec, found.get(name)):
                    continue
                assert spec.date_column is not None
                axis = _Axis(spec.date_column, _DAY_KINDS[found[name][spec.date_column]])
                table = _Table(schema, name, spec, contract, axis, as_of, today, zone)
                latest = table._probe(conn, cur, "latest", table.params)
                if isinstance(latest, _Failure) or (latest and _day(latest) >= table.last_day):
                    continue
                waiting.append(
                    f"{table.target}.{spec.date_column}: rows through {table.last_day} expected, "
                    f"latest {latest or 'none'}"
                )
    finally:
        conn.close()
    return waiting


def _relation(conn: Any, cur: Any, schema: str, rel: Relation) -> CheckResult:
    """Rows of ``rel.table`` joined to ``rel.join`` that break ``rel.rule``."""
    query = sql.SQL(
        "SELECT count(*) FROM {} AS {} JOIN {} AS {} USING ({}) WHERE NOT ({}\n)"
    ).format(
        sql.Identifier(schema, rel.table),
        sql.Identifier(rel.table),
        sql.Identifier(schema, rel.join),
        sql.Identifier(rel.join),
        sql.SQL(", ").join(sql.Identifier(c) for c in rel.using),
        sql.SQL(rel.rule.replace("%", "%%")),
    )
    try:
        measured: Any = int(_run(conn, cur, query, {})[0][0])
    except _QueryFailed as exc:
        measured = _Failure(exc.message)
    return _judge(
        "cross_rule",
        f"{schema}.{rel.table} x {schema}.{rel.join}: {rel.name}",
        f"every row of {rel.table} joined to {rel.join} on {', '.join(rel.using)} has {rel.rule}",
        measured,
        lambda bad: (bad == 0, f"{bad} rows break it"),
    )


def rewritten_days(
    previous: Mapping[str, Mapping[date, int]],
    seen_before: date,
    current: Mapping[str, Mapping[date, int]],
    schema: str,
    contract: Contract,
    since: date | None = None,
) -> list[CheckResult]:
    """Past days whose row counts changed since an earlier run counted them.

    ``previous`` are the rows per day an earlier run saw of each table (days before its
    own run date ``seen_before``); ``current`` what this run sees. A change warns; more
    changed rows than ``contract.max_rewritten_fraction`` of what the earlier run saw on
    the compared days fails. Days before ``since`` are not compared.
    """
    out = []
    for table, before in previous.items():
        now = current.get(table)
        if now is None:
            continue
        compared = [d for d in before if d < seen_before and (since is None or d >= since)]
        changed = {d: (before[d], now.get(d, 0)) for d in compared if now.get(d, 0) != before[d]}
        seen = sum(before[d] for d in compared)
        moved = sum(abs(b - a) for a, b in changed.values())
        limit = contract.max_rewritten_fraction
        fraction = moved / seen if seen else (1.0 if moved else 0.0)
        shown = "; ".join(f"{d}: {a:,} -> {b:,} rows" for d, (a, b) in sorted(changed.items())[:5])
        more = f"; and {len(changed) - 5} more days" if len(changed) > 5 else ""
        out.append(
            CheckResult(
                STAGE,
                "history_unchanged",
                f"{schema}.{table}",
                not changed,
                f"past days as an earlier run counted them (changes warn; more than "
                f"{limit:.1%} of their rows fail: max_rewritten_fraction)",
                f"{len(changed)} of {len(compared)} days changed, {moved:,} rows "
                f"({percent(fraction, limit, 2)}){': ' + shown + more if changed else ''}",
                severity="fail" if fraction > limit else "warn",
            )
        )
    return out


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
    before = _day(before)
    zone = contract.timezone or timezone
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            _begin(conn, cur, zone)
            found = _catalog(conn, cur, schema, names)
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
                axis = _Axis(column, _DAY_KINDS[data_type])
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
                rows = _run(conn, cur, query, {"tz": zone, "end": before})
            except _QueryFailed as exc:
                raise SourceError(
                    f"cannot find the start of the history in schema {schema!r}: {exc.message}"
                ) from exc
    finally:
        conn.close()
    return {str(name): None if day is None else db.to_date(day) for name, day in rows}
