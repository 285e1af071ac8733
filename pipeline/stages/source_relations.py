"""Rules across two joined source tables (a contract's ``relations``): counted over the
whole tables, or, when the earlier days of both tables are proved unchanged since a night
that kept its count (``pipeline.stages.source_scans``), only over the joined rows that
hold a row from a day read tonight.

Rows break a rule only in pairs. When neither table lost or changed a row before the days
read tonight, the pairs of two older rows are the pairs the earlier night counted; the
others hold a newer row of the table, or an older row of the table and a newer row of the
joined table. So tonight's count is the kept count plus those two.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

from psycopg2 import sql

from pipeline.conf.contract import Relation
from pipeline.stages.checks import CheckResult
from pipeline.stages.source_queries import Axis, Failure, QueryFailed, judge, run_query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptCount:
    """Rows of a relation that broke its rule as a night counted them, and its query."""

    shape: str
    broken: int


@dataclass(frozen=True)
class Counted:
    """A relation's count tonight (or the failure of its query), its query's shape and the
    days from which each table's rows were read (None: the whole tables)."""

    broken: int | Failure
    shape: str
    starts: tuple[date, date] | None


@dataclass(frozen=True)
class RelationCheck:
    """The rule ``rel`` over ``schema``; ``starts`` (the table's, the joined table's) with
    ``axes`` and ``kept``: count only the pairs with a row from those days on."""

    rel: Relation
    schema: str
    timezone: str
    axes: tuple[Axis, Axis] | None = None
    starts: tuple[date, date] | None = None
    kept: KeptCount | None = None

    def _query(self, where: sql.Composable) -> sql.Composable:
        rel = self.rel
        return sql.SQL(
            "SELECT count(*) FROM {} AS {} JOIN {} AS {} USING ({}) WHERE NOT ({}\n) AND {}"
        ).format(
            sql.Identifier(self.schema, rel.table),
            sql.Identifier(rel.table),
            sql.Identifier(self.schema, rel.join),
            sql.Identifier(rel.join),
            sql.SQL(", ").join(sql.Identifier(c) for c in rel.using),
            sql.SQL(rel.rule.replace("%", "%%")),
            where,
        )

    def measure(self, conn: Any, cur: Any) -> Counted:
        whole = self._query(sql.SQL("TRUE"))
        shape = hashlib.md5(whole.as_string(conn).encode()).hexdigest()
        try:
            if self.axes and self.starts and self.kept and self.kept.shape == shape:
                (mine, theirs), (table, join) = self.axes, (self.rel.table, self.rel.join)
                newer = _since(mine, table, "rel_table_start")
                # a row dated NULL is on no day read tonight: older (a NULL-dated row
                # inserted since is on no day read either, so the proof fails for it)
                older_with_newer = sql.SQL("({}) IS NOT TRUE AND {}").format(
                    newer, _since(theirs, join, "rel_join_start")
                )
                query = sql.SQL("SELECT ({}) + ({})").format(
                    self._query(newer), self._query(older_with_newer)
                )
                params = {
                    "tz": self.timezone,
                    "rel_table_start": self.starts[0],
                    "rel_join_start": self.starts[1],
                }
                added = int(run_query(conn, cur, query, params)[0][0])
                log.info(
                    "%s: the pairs with a row of %s from %s or of %s from %s counted (%d "
                    "break it), the others kept (%d)",
                    self.rel.name,
                    table,
                    self.starts[0],
                    join,
                    self.starts[1],
                    added,
                    self.kept.broken,
                )
                return Counted(self.kept.broken + added, shape, self.starts)
            return Counted(int(run_query(conn, cur, whole, {})[0][0]), shape, None)
        except QueryFailed as exc:
            return Counted(Failure(exc.message), shape, None)

    def result(self, counted: Counted) -> CheckResult:
        rel = self.rel
        return judge(
            "cross_rule",
            f"{self.schema}.{rel.table} x {self.schema}.{rel.join}: {rel.name}",
            f"every row of {rel.table} joined to {rel.join} on {', '.join(rel.using)} "
            f"has {rel.rule}",
            counted.broken,
            lambda bad: (bad == 0, f"{bad} rows break it"),
        )


def _since(axis: Axis, table: str, name: str) -> sql.Composable:
    """Rows of ``table`` dated from the day bound to ``name`` on."""
    return sql.SQL("{} >= {}").format(sql.Identifier(table, axis.column), axis.bound(name))
