"""Source contracts: the warehouse tables a use case reads, declared in YAML and checked
before featurizing.

A contract (``usecases/<name>/contract.yaml``) names each table, its columns and their
types, the column that dates a row, and the checks to run on it: freshness, daily
volume, value rules, unique keys, null fractions and references to another table's key.
``check_sources`` turns a contract into ``CheckResult`` values for the gate in
``pipeline.stages.checks``; the code holds no table or column name of any warehouse. The volume
rule itself (``judge_day``) is a plain function of rows per day, which
``benchmarks/volume.py`` measures on series of known truth.

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
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any

import psycopg2
from psycopg2 import sql

from pipeline.conf.contract import (
    _DAY_KINDS,
    Contract,
    Relation,
    TableSpec,
    VolumeSpec,
    dated_tables,
)
from pipeline.core.errors import ConfigError, SourceError
from pipeline.core.faults import fault_point
from pipeline.core.figures import beside, percent, within
from pipeline.stages.checks import CheckResult
from pipeline.store import db

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


def _begin(conn: Any, cur: Any, timezone: str, session: Mapping[str, str] | None = None) -> date:
    """Start a read-only snapshot (rules are SQL text: they must not write) with the
    settings ``session``, and return today in ``timezone`` from the server's clock.

    Raises:
        ConfigError: PostgreSQL does not know ``timezone``.
    """
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    _settle(cur, session)
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


def _settle(cur: Any, session: Mapping[str, str] | None) -> None:
    """The transaction's PostgreSQL settings.

    Raises:
        ConfigError: PostgreSQL refuses a name or a value.
    """
    for name, value in (session or {}).items():
        try:
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        except psycopg2.Error as exc:
            raise db.refused_setting("warehouse.session", name, value, _first_line(exc)) from exc


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


# -- the volume rule: rows per day in, a verdict out (benchmarks/volume.py measures it) ---


@dataclass(frozen=True)
class DayVolume:
    """A day's rows against the rows its peer days lead one to expect (``judge_day``)."""

    day: date
    rows: int
    expected: float  # the median rows of the peer days
    peers: int  # how many peer days (none: nothing to compare with, the day passes)
    low: float  # the ratio bounds in force on the day: its calendar entry's, else the table's
    high: float
    noise_sd: float
    calendar: bool  # the volume calendar lists the day

    @property
    def ratio(self) -> float:
        """Rows over expected rows (1 when both are 0: a day that is always empty)."""
        if self.expected:
            return self.rows / self.expected
        return 1.0 if self.rows == 0 else math.inf

    @property
    def deviation(self) -> float:
        """How many standard deviations of counting noise the rows lie from the expected
        rows: the square root of a Poisson count (Anscombe's, plus 3/8) has a standard
        deviation of 1/2 whatever its mean."""
        return 2 * abs(math.sqrt(self.rows + 0.375) - math.sqrt(self.expected + 0.375))

    @property
    def passed(self) -> bool:
        return (
            not self.peers or self.low <= self.ratio <= self.high or self.deviation <= self.noise_sd
        )

    def found(self) -> str:
        """The rows, the median and the ratio, to the digit that shows its side of the
        bounds; the deviation too when the ratio is outside them."""
        if not self.peers:
            return f"{self.rows:,} rows; no earlier day to compare with"
        text = (
            f"{self.rows:,} rows vs a median of {self.expected:,.0f} "
            f"({within(self.ratio, self.low, self.high)} x"
        )
        if not self.low <= self.ratio <= self.high:
            text += f", {beside(self.deviation, self.noise_sd, 1)} sd of counting noise"
        if self.calendar:
            text += f"; a calendar day: {self.low:g}..{self.high:g} x"
        return text + ")"


def judge_day(
    counts: Mapping[date, int], day: date, peers: Sequence[date], spec: VolumeSpec
) -> DayVolume:
    """The rows of ``day`` against the median rows of ``peers`` (a day without rows counts
    0), under the bounds ``spec`` sets for ``day`` (its calendar's, else its own). Peers the
    calendar lists are left out, unless it lists them all."""
    usual = [p for p in peers if spec.bounds(p) is None] or list(peers)
    expected = float(statistics.median([counts.get(p, 0) for p in usual])) if usual else 0.0
    bounds = spec.bounds(day)
    low, high = bounds or (spec.min_ratio, spec.max_ratio)
    return DayVolume(
        day,
        counts.get(day, 0),
        expected,
        len(usual),
        low,
        high,
        spec.noise_sd,
        bounds is not None,
    )


def daily_volume(
    counts: Mapping[date, int], day: date, spec: VolumeSpec, since: date | None = None
) -> DayVolume:
    """The ``daily_volume`` check: ``day`` against the same weekday in the
    ``spec.trailing_days`` days before it (every one of those days when not ``weekly``).
    Days before ``since``, the table's first day of rows, are no peers."""
    peers = [
        day - timedelta(days=i)
        for i in range(1, spec.trailing_days + 1)
        if not spec.weekly or i % 7 == 0
    ]
    if since is not None:
        peers = [p for p in peers if p >= since]
    return judge_day(counts, day, peers, spec)


def window_volume(
    counts: Mapping[date, int],
    first: date,
    last: date,
    spec: VolumeSpec,
    since: date | None = None,
) -> list[DayVolume]:
    """The ``days_complete`` check: each day of ``first..last`` judged as
    :func:`daily_volume` judges a last day. A day that passed on its own night passes
    here unless its rows or its peers' rows have changed since (a day shifted by a time
    zone bug, a reload), so a clean series stops no more nights here than there."""
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    return [daily_volume(counts, d, spec, since) for d in days]


def _volume_expected(spec: VolumeSpec, day: date, peers: str) -> str:
    bounds = spec.bounds(day)
    low, high = bounds or (spec.min_ratio, spec.max_ratio)
    shown = f"{low:g}..{high:g} x {peers}"
    if bounds is not None:
        shown += f" ({day} is a calendar day)"
    return (
        f"{shown}, or within {spec.noise_sd:g} sd of counting noise "
        "(volume: min_ratio, max_ratio, noise_sd, calendar)"
    )


_Reader = Callable[[list[Any]], dict[str, Any]]
_LOOK_UP = object()  # the newest day before D lies outside the scanned range
_EXAMPLES = 5  # orphan keys a references check names


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
    references: tuple[str, ...] = ()  # columns whose references are checked
    history_days: int = 0  # days before as_of whose rows and content are kept as evidence
    column_types: Mapping[str, str] = field(default_factory=dict)  # information_schema's
    record_hash: bool = True  # fingerprints by hash_record_extended (PostgreSQL 14+)

    @property
    def content(self) -> sql.Composable:
        """The fingerprint of a group of rows' declared columns (``db.fingerprint``)."""
        return db.fingerprint(list(self.spec.columns), self.column_types, self.record_hash)

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
    def new_start(self) -> date:
        """The first of the contract's new days: rows dated from here to the last day."""
        return self.as_of - timedelta(days=self.contract.new_days)

    @property
    def volume_start(self) -> date:
        """The first day the volume checks read: the trailing days of the window's first."""
        days = self.spec.volume.trailing_days if self.spec.volume else 0
        return self.window_start - timedelta(days=days)

    @property
    def history_start(self) -> date:
        """The first day whose rows and content this run keeps as evidence (what the use
        case reads of the table, back to its lookback), for ``history_unchanged``."""
        return min(self.window_start, self.as_of - timedelta(days=self.history_days))

    @property
    def params(self) -> dict[str, Any]:
        future = self.future_from
        return {
            "tz": self.timezone,
            "end": self.as_of,
            "start": self.window_start,
            "volume_start": self.volume_start,
            "new_start": self.new_start,
            "tomorrow": future,
            # one range scan covers the window, the volume days, the history kept as
            # evidence and every future row
            "scan_start": min(self.window_start, self.volume_start, self.history_start, future),
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

    def _orphans(self, column: str) -> sql.Composable:
        """Rows of the new days (the whole table without a date column), and those whose
        ``column`` the referenced column lacks: an anti-join that probes the referenced
        column (which an index should serve) once per row of the new days."""
        referenced = self.spec.columns[column].referenced
        assert referenced is not None
        table, target = referenced
        new: sql.Composable = sql.SQL("TRUE")
        if self.axis is not None:
            new = sql.SQL("{} AND {}").format(self.axis.since("new_start"), self.axis.before("end"))
        key = sql.Identifier("f", column)
        return sql.SQL(
            "WITH orphans AS MATERIALIZED (SELECT {key} AS key FROM {t} AS f "
            "WHERE {new} AND {key} IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM {ref} AS r WHERE {target} = {key})) "
            "SELECT (SELECT count(*) FROM {t} AS f WHERE {new}), (SELECT count(*) FROM orphans), "
            "(SELECT count(DISTINCT key) FROM orphans), "
            "CAST(ARRAY(SELECT DISTINCT key FROM orphans ORDER BY 1 LIMIT {n}) AS text[])"
        ).format(
            key=key,
            t=self.relation,
            new=new,
            ref=sql.Identifier(self.schema, table),
            target=sql.Identifier("r", target),
            n=sql.Literal(_EXAMPLES),
        )

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
        if kind == "ref":
            return self._orphans(arg), lambda rows: tuple(rows[0])
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
            return (
                sql.SQL("SELECT {}, count(*), {} FROM {} WHERE {} AND {} GROUP BY 1").format(
                    self.axis.day(col),
                    self.content,
                    t,
                    self.axis.since("scan_start"),
                    self.axis.before("end"),
                ),
                lambda rows: {day: (int(n), str(content)) for day, n, content in rows},
            )
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
        # one anti-join per reference, over the new days' rows only
        references: list[tuple[list[str], sql.Composable, _Reader]] = [
            ([f"ref:{c}"], self._orphans(c), partial(_read_orphans, f"ref:{c}"))
            for c in self.references
        ]
        if self.axis is None:
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join([sql.SQL("count(*)"), *nulls, *rules, *uniques]), t
            )
            return [(self._keys(), query, self._read_whole), *references]
        day = sql.SQL("LEAST({}, CAST({} AS date))").format(
            self.axis.day(sql.Identifier(self.axis.column)), sql.Placeholder("cap")
        )
        content = self.content
        grouped = sql.SQL("SELECT {} FROM {} WHERE {} GROUP BY 1").format(
            sql.SQL(", ").join([day, sql.SQL("count(*)"), content, *nulls, *rules]),
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
        return [*out, *references]

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
        evidence: dict[date, tuple[int, str]] = {}
        for day, n, content, *rest in rows:
            if day >= self.future_from:
                future += n
            if day < self.as_of:
                counts[day] = n
                evidence[day] = (n, str(content))
                if day >= self.window_start:
                    total += n
                    nonnull = [a + b for a, b in zip(nonnull, rest[:ncols], strict=True)]
                    bad = [a + b for a, b in zip(bad, rest[ncols:], strict=True)]
        out: dict[str, Any] = {"future": future, "volume": counts, "days": evidence}
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
        rules, unique keys, references, then non-finite values and null fractions
        (failures only)."""
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
                peers = f"the {vol.trailing_days} days before"
                if vol.weekly:
                    peers = f"the same weekday in {peers}"
                out.append(
                    _judge(
                        "daily_volume",
                        f"{t} on {self.last_day}",
                        _volume_expected(
                            vol,
                            self.last_day,
                            f"the median of {peers}",
                        ),
                        measured["volume"],
                        lambda counts: self._volume(counts, vol),
                    )
                )
                out.append(
                    _judge(
                        "days_complete",
                        dated,
                        f"every day {self.window_start}..{self.last_day - timedelta(days=1)} "
                        f"within {vol.min_ratio:g}..{vol.max_ratio:g} x the median of "
                        f"{peers} it (calendar days: their own bounds), or within "
                        f"{vol.noise_sd:g} sd of counting noise "
                        "(volume: min_ratio, max_ratio, noise_sd, calendar)",
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
        for column in self.references:
            declared = self.spec.columns[column]
            limit = declared.max_orphan_fraction
            days = (
                f"{self.new_start}..{self.last_day}"
                if self.new_start < self.last_day
                else f"{self.last_day}"
            )
            rows = f"rows dated {days} (new_days)" if self.axis is not None else "rows"
            out.append(
                _judge(
                    "references",
                    f"{t}.{column}",
                    f"every {column} of the {rows} in {self.schema}.{declared.references}, "
                    f"orphans at most {limit:.1%} of those rows (max_orphan_fraction)",
                    measured[f"ref:{column}"],
                    partial(
                        _orphan_verdict,
                        limit=limit,
                        referenced=f"{self.schema}.{declared.references}",
                    ),
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
        """Every day of the window has as many rows as its own night expected (a day
        shifted by a time zone bug leaves a gap and a double)."""
        # the last day has its own check (daily_volume)
        days = window_volume(
            counts, self.window_start, self.last_day - timedelta(days=1), vol, _since(counts)
        )
        typical = statistics.median(d.expected for d in days)
        odd = [f"{d.day}: {d.found()}" for d in days if not d.passed]
        if not odd:
            return True, f"{len(days)} days, median {typical:,.0f} rows"
        shown = "; ".join(odd[:5]) + (f"; and {len(odd) - 5} more days" if len(odd) > 5 else "")
        return False, f"median {typical:,.0f} rows a day; {shown}"

    def _volume(self, counts: Mapping[date, int], vol: VolumeSpec) -> tuple[bool, str]:
        judged = daily_volume(counts, self.last_day, vol, _since(counts))
        return judged.passed, judged.found()


def _since(counts: Mapping[date, int]) -> date | None:
    """The first day with rows among the scanned days: the table's first, when its history
    is shorter than the scan (no earlier day is a peer)."""
    return min(counts, default=None)


def _read_orphans(key: str, rows: list[Any]) -> dict[str, Any]:
    return {key: tuple(rows[0])}


def _orphan_verdict(
    measured: tuple[int, int, int, list[str] | None], limit: float, referenced: str
) -> tuple[bool, str]:
    total, orphans, keys, examples = measured
    fraction = orphans / total if total else 0.0
    if not orphans:
        return True, f"0 of {total:,} rows"
    shown = ", ".join(examples or [])
    more = f" and {keys - len(examples or []):,} more keys" if keys > len(examples or []) else ""
    return (
        fraction <= limit,
        f"{orphans:,} of {total:,} rows ({percent(fraction, limit, 2)}) reference no "
        f"{referenced}: {shown}{more}",
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
    """What the source checks found, and per day each dated table held before the run date
    (over its lookback) its rows and a fingerprint of their content: what a later run
    compares to see history rewritten (``rewritten_days``)."""

    results: list[CheckResult]
    days: dict[str, dict[date, tuple[int, str]]]


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
            today = _begin(conn, cur, zone, session)
            snapshot = _export(conn, cur)
            if snapshot is None:  # the failed export ended the transaction: a new one
                today = _begin(conn, cur, zone, session)
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
                    schema,
                    name,
                    spec,
                    contract,
                    axis,
                    as_of,
                    today,
                    zone,
                    entity_key,
                    floats,
                    history_days=(history_days or {}).get(name, 0),
                    column_types=found[name],
                    record_hash=db.hashes_records(conn),
                )
            for name, checked in tables.items():  # references to tables whose shape matches
                refs = tuple(
                    c
                    for c, declared in checked.spec.columns.items()
                    if declared.referenced is not None and declared.referenced[0] in tables
                )
                tables[name] = replace(checked, references=refs)
            relations = [r for r in contract.relations if {r.table, r.join} <= tables.keys()]
            work: list[_Table | Relation] = [*tables.values(), *relations]
            outcome = _measure_all(url, conn, cur, schema, snapshot, work, session)
    finally:
        conn.close()
    measured = dict(zip(tables, outcome, strict=False))
    results: list[CheckResult] = []
    days: dict[str, dict[date, tuple[int, str]]] = {}
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
    session: Mapping[str, str] | None = None,
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
                    _settle(k, session)
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
    previous: Mapping[str, Mapping[date, tuple[int, str | None]]],
    seen_before: date,
    current: Mapping[str, Mapping[date, tuple[int, str | None]]],
    schema: str,
    contract: Contract,
    since: Mapping[str, date] | None = None,
) -> list[CheckResult]:
    """Past days that changed since an earlier run saw them: rows added or removed, or the
    same rows with other content (restated in place).

    ``previous`` is what an earlier run saw of each table per day (rows and a content
    fingerprint, for days before its own run date ``seen_before``); ``current`` what this
    run sees. Days before ``since[table]`` (the lookback of what the use case reads) are not
    compared. A change warns; more added or removed rows than
    ``contract.max_rewritten_fraction`` of what the earlier run saw on the compared days
    fails. A day restated with the same rows warns (the kept windows are rebuilt from the
    facts, so nothing served relies on the old values).
    """
    out = []
    for table, before in previous.items():
        now = current.get(table)
        if now is None:
            continue
        first = (since or {}).get(table)
        compared = [d for d in before if d < seen_before and (first is None or d >= first)]
        counted: dict[date, tuple[int, int]] = {}
        restated: list[tuple[date, int]] = []
        for d in compared:
            (was, was_content), (rows, content) = before[d], now.get(d, (0, None))
            if rows != was:
                counted[d] = (was, rows)
            elif db.same_kind(was_content, content) and content != was_content:
                restated.append((d, rows))
        seen = sum(before[d][0] for d in compared)
        moved = sum(abs(b - a) for a, b in counted.values())
        limit = contract.max_rewritten_fraction
        fraction = moved / seen if seen else (1.0 if moved else 0.0)
        said = [(d, f"{d}: {a:,} -> {b:,} rows") for d, (a, b) in counted.items()]
        said += [(d, f"{d}: {n:,} rows, content changed") for d, n in restated]
        said.sort()
        shown = "; ".join(text for _, text in said[:5])
        more = f"; and {len(said) - 5} more days" if len(said) > 5 else ""
        window = f" since {first}" if first is not None else ""
        out.append(
            CheckResult(
                STAGE,
                "history_unchanged",
                f"{schema}.{table}",
                not said,
                f"past days{window} as an earlier run saw them, rows and content (changes "
                f"warn; more than {limit:.1%} of their rows added or removed fail: "
                "max_rewritten_fraction)",
                f"{len(said)} of {len(compared)} days changed ({len(restated)} restated in "
                f"place), {moved:,} rows added or removed ({percent(fraction, limit, 2)})"
                f"{': ' + shown + more if said else ''}",
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
