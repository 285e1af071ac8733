"""The checks of one source table whose shape matches its contract: their SQL, their
measurements and their results.

``TableChecks.measure`` runs a few queries that measure every check of the table at once
(one range scan groups the rows by day: future rows, freshness, volume, the rows and
content kept as evidence, value rules, NaN and null counts; one query counts duplicate
keys; one anti-join per reference). When one fails, each of its checks runs its own query,
so that the failure is pinned on the check and column that caused it.
``TableChecks.results`` turns the measurements into ``CheckResult`` values.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import partial
from typing import Any

from psycopg2 import sql

from pipeline.conf.contract import Contract, TableSpec, VolumeSpec
from pipeline.core.figures import percent
from pipeline.stages.checks import CheckResult
from pipeline.stages.source_days import daily_volume, volume_expected, window_volume
from pipeline.stages.source_queries import STAGE, Axis, Failure, QueryFailed, judge, run_query
from pipeline.stages.source_scans import Counters, Kept, accounts_for, usable_from
from pipeline.store import db

log = logging.getLogger(__name__)

_Reader = Callable[[list[Any]], dict[str, Any]]
_LOOK_UP = object()  # the newest day before D lies outside the scanned range
_EXAMPLES = 5  # orphan keys a references check names


@dataclass(frozen=True)
class Scope:
    """What the checks of every table share: the schema of the tables, their contract, the
    run date, today on the server's clock, the time zone of the days and the entity key."""

    schema: str
    contract: Contract
    as_of: date
    today: date
    timezone: str
    entity_key: str | None = None


@dataclass(frozen=True)
class TableChecks:
    """The checks of one source table whose shape matches its contract."""

    scope: Scope
    name: str
    spec: TableSpec
    axis: Axis | None
    floats: tuple[str, ...] = ()  # declared columns stored as numeric, real or double
    references: tuple[str, ...] = ()  # columns whose references are checked
    history_days: int = 0  # days before as_of whose rows and content are kept as evidence
    column_types: Mapping[str, str] = field(default_factory=dict)  # information_schema's
    record_hash: bool = True  # fingerprints by hash_record_extended (PostgreSQL 14+)
    counters: Counters | None = None  # the table's change counters, read before the snapshot
    kept: Kept | None = None  # what an earlier night's scan of its days found
    # unique keys (positions in spec.unique) a unique index proves, with the index's name
    proven: Mapping[int, str] = field(default_factory=dict)

    @property
    def content(self) -> sql.Composable:
        """The fingerprint of a group of rows' declared columns (``db.fingerprint``)."""
        return db.fingerprint(list(self.spec.columns), self.column_types, self.record_hash)

    @property
    def future_from(self) -> date:
        """Rows dated on or after this day are in the future: the run date itself for a
        run of today (or later), else tomorrow (a backfill sees later facts rightly)."""
        return (
            self.scope.as_of
            if self.scope.as_of >= self.scope.today
            else self.scope.today + timedelta(days=1)
        )

    @property
    def target(self) -> str:
        return f"{self.scope.schema}.{self.name}"

    @property
    def relation(self) -> sql.Composable:
        return sql.Identifier(self.scope.schema, self.name)

    @property
    def last_day(self) -> date:
        return self.scope.as_of - timedelta(days=1)

    @property
    def window_start(self) -> date:
        return self.scope.as_of - timedelta(days=self.scope.contract.window_days)

    @property
    def new_start(self) -> date:
        """The first of the contract's new days: rows dated from here to the last day."""
        return self.scope.as_of - timedelta(days=self.scope.contract.new_days)

    @property
    def volume_start(self) -> date:
        """The first day the volume checks read: the trailing days of the window's first."""
        days = self.spec.volume.trailing_days if self.spec.volume else 0
        return self.window_start - timedelta(days=days)

    @property
    def history_start(self) -> date:
        """The first day whose rows and content this run keeps as evidence (what the use
        case reads of the table, back to its lookback), for ``history_unchanged``."""
        return min(self.window_start, self.scope.as_of - timedelta(days=self.history_days))

    @property
    def params(self) -> dict[str, Any]:
        future = self.future_from
        return {
            "tz": self.scope.timezone,
            "end": self.scope.as_of,
            "start": self.window_start,
            "volume_start": self.volume_start,
            "new_start": self.new_start,
            "tomorrow": future,
            # one range scan covers the window, the volume days, the history kept as
            # evidence and every future row
            "scan_start": min(self.window_start, self.volume_start, self.history_start, future),
            # days from here on are all in the future: one group is enough to count them
            "cap": max(self.scope.as_of, future),
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
            ref=sql.Identifier(self.scope.schema, table),
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
        keys += [f"unique:{j}" for j in self._unproven]
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
        uniques = [self._distinct(spec.unique[j]) for j in self._unproven]
        unique_keys = [f"unique:{j}" for j in self._unproven]
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
        return {
            f"unique:{j}": int(total) - int(d)
            for j, d in zip(self._unproven, distinct, strict=True)
        }

    @property
    def _unproven(self) -> list[int]:
        """The unique keys no unique index proves: those a query counts."""
        return [j for j in range(len(self.spec.unique)) if j not in self.proven]

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
            if day < self.scope.as_of:
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
        """Every check's measurement, or a ``Failure`` when its query failed.

        The fast queries come first; when one fails, each of its checks runs its own
        query so that the failure is pinned on the check (and column) that caused it. A
        timeout is not retried check by check: it would cost one timeout per check.
        """
        params = self.params
        out: dict[str, Any] = {}
        for keys, query, read in self.fast_queries():
            try:
                if "days" in keys:  # the grouped scan of the days, read where they changed
                    rows, out["kept"] = self._scan_days(conn, cur, query, params)
                else:
                    rows = run_query(conn, cur, query, params)
                measured = read(rows)
                out |= {k: measured[k] for k in keys}
            except QueryFailed as exc:
                if exc.timed_out:
                    out |= {k: Failure(exc.message) for k in keys}
                    continue
                log.info("%s: %s; running its checks one by one", self.target, exc.message)
                for key in keys:
                    out[key] = self.measure_one(conn, cur, key, params)
        if out.get("latest") is _LOOK_UP:
            out["latest"] = self.measure_one(conn, cur, "latest", params)
        return out

    @property
    def unchanged_before(self) -> date | None:
        """The first day the scan of the days will read when the change counters hold
        (``usable_from``; the scan proves it, ``Kept.read_from``), None: every day."""
        return usable_from(self.kept, self.counters, self.params["scan_start"], self.scope.as_of)

    def _scan_days(
        self, conn: Any, cur: Any, query: sql.Composable, params: Mapping[str, Any]
    ) -> tuple[list[Any], Kept]:
        """The grouped rows per day from ``scan_start`` on, and what to keep of them.

        When the earlier night's scan (``kept``) and the change counters show that no day
        before its run date can have changed (``source_scans``), only the days from there on
        are read and the earlier ones are taken from ``kept``; the whole range is read when
        the rows inserted since are not all among the days read.
        """
        shape = hashlib.md5(query.as_string(conn).encode()).hexdigest()
        first: date = params["scan_start"]
        same_query = self.kept is not None and self.kept.shape == shape
        start = self.unchanged_before if same_query else None
        rows, read_from = None, first
        if start is not None:
            assert self.kept is not None and self.counters is not None
            scanned = run_query(conn, cur, query, {**params, "scan_start": start})
            if accounts_for(self.kept, self.counters, sum(int(r[1]) for r in scanned)):
                earlier = [
                    (d, n, content, *tallies)
                    for d, (n, content, tallies) in sorted(self.kept.days.items())
                    if first <= d < start
                ]
                rows, read_from = [*earlier, *scanned], start
            else:
                log.info(
                    "%s: rows were added on days before %s since the night of that date; "
                    "every day from %s read",
                    self.target,
                    start,
                    first,
                )
        if rows is None:
            rows = run_query(conn, cur, query, params)
        as_of = self.scope.as_of
        kept = Kept(
            as_of,
            first,
            shape,
            self.counters,
            sum(int(n) for day, n, *_ in rows if day >= as_of),
            {d: (int(n), str(c), tuple(int(x) for x in t)) for d, n, c, *t in rows if d < as_of},
            read_from,
        )
        return rows, kept

    def measure_one(self, conn: Any, cur: Any, key: str, params: Mapping[str, Any]) -> Any:
        """One check's measurement by its own query, or a ``Failure`` when that failed."""
        query, read = self.probe(key)
        try:
            return read(run_query(conn, cur, query, params))
        except QueryFailed as exc:
            return Failure(exc.message)

    def results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        """The checks of the table, in the order: future rows, freshness, volume, value
        rules, unique keys, references, then non-finite values and null fractions
        (failures only)."""
        return [
            *self._dated_results(measured),
            *self._rule_results(measured),
            *self._unique_results(measured),
            *self._reference_results(measured),
            *[r for r in self._finite_results(measured) if not r.passed],
            *[r for r in self._null_results(measured) if not r.passed],
        ]

    @property
    def _checked_rows(self) -> str:
        """The rows the value rules and the NaN counts read."""
        if self.axis is None:
            return "every row"
        return f"every row dated {self.window_start}..{self.last_day}"

    def _dated_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        """Future rows, freshness and volume (none without a date column)."""
        if self.axis is None:
            return []
        dated = f"{self.target}.{self.axis.column}"
        out = [
            judge(
                "no_future_rows",
                dated,
                f"0 rows dated on or after {self.future_from}",
                measured["future"],
                lambda n: (n == 0, f"{n} rows"),
            )
        ]
        if self.spec.fresh:
            out.append(
                judge(
                    "fresh_through",
                    dated,
                    f"rows through {self.last_day}",
                    measured["latest"],
                    lambda latest: (
                        latest == self.last_day,
                        f"latest {latest}"
                        if latest
                        else f"no rows dated before {self.scope.as_of}",
                    ),
                )
            )
        if self.spec.volume is not None:
            out += self._volume_results(measured, dated, self.spec.volume)
        return out

    def _volume_results(
        self, measured: Mapping[str, Any], dated: str, vol: VolumeSpec
    ) -> list[CheckResult]:
        """The last day's volume, then every other day of the window's."""
        peers = f"the {vol.trailing_days} days before"
        if vol.weekly:
            peers = f"the same weekday in {peers}"
        return [
            judge(
                "daily_volume",
                f"{self.target} on {self.last_day}",
                volume_expected(
                    vol,
                    self.last_day,
                    f"the median of {peers}",
                ),
                measured["volume"],
                lambda counts: self._volume(counts, vol),
            ),
            judge(
                "days_complete",
                dated,
                f"every day {self.window_start}..{self.last_day - timedelta(days=1)} "
                f"within {vol.min_ratio:g}..{vol.max_ratio:g} x the median of "
                f"{peers} it (calendar days: their own bounds), or within "
                f"{vol.noise_sd:g} sd of counting noise "
                "(volume: min_ratio, max_ratio, noise_sd, calendar)",
                measured["volume"],
                lambda counts: self._complete(counts, vol),
            ),
        ]

    def _rule_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        return [
            judge(
                "value_rule",
                self.target,
                f"{self._checked_rows} has {rule}",
                measured[f"rule:{i}"],
                lambda bad: (bad == 0, f"{bad} rows violate it"),
            )
            for i, rule in enumerate(self.spec.rules)
        ]

    def _unique_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        out = []
        for j, key in enumerate(self.spec.unique):
            label = key[0] if len(key) == 1 else f"({', '.join(key)})"
            target = f"{self.target}.{label}"
            if j in self.proven:
                found = f"0 duplicate rows: unique index {self.proven[j]} on NOT NULL columns"
                out.append(CheckResult(STAGE, "unique_key", target, True, "one row per key", found))
                continue
            out.append(
                judge(
                    "unique_key",
                    target,
                    "one row per key",
                    measured[f"unique:{j}"],
                    lambda dupes: (dupes == 0, f"{dupes} duplicate rows"),
                )
            )
        return out

    def _reference_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        out = []
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
                judge(
                    "references",
                    f"{self.target}.{column}",
                    f"every {column} of the {rows} in {self.scope.schema}.{declared.references}, "
                    f"orphans at most {limit:.1%} of those rows (max_orphan_fraction)",
                    measured[f"ref:{column}"],
                    partial(
                        _orphan_verdict,
                        limit=limit,
                        referenced=f"{self.scope.schema}.{declared.references}",
                    ),
                )
            )
        return out

    def _finite_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        return [
            judge(
                "finite",
                f"{self.target}.{column}",
                f"no NaN or infinite values in {self._checked_rows.removeprefix('every ')}",
                measured[f"finite:{column}"],
                lambda bad: (bad == 0, f"{bad} rows NaN or infinite"),
            )
            for column in self.floats
        ]

    def _null_results(self, measured: Mapping[str, Any]) -> list[CheckResult]:
        where = (
            f"in the last {self.scope.contract.window_days} days"
            if self.axis is not None
            else "in the whole table"
        )
        out = []
        for column in self.spec.columns:
            limit = self.scope.contract.null_limit(self.name, column, self.scope.entity_key)
            out.append(
                judge(
                    "null_fraction",
                    f"{self.target}.{column}",
                    f"<= {limit * 100:g}% nulls",
                    measured[f"null:{column}"],
                    partial(_null_verdict, limit=limit, where=where),
                )
            )
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
