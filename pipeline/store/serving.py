"""The serving database's objects: the shared schema, and each use case's generated tables.

``nightscore db init`` applies ``sql/schema/*.sql`` (registry, ledger, monitoring, roles),
then, for every use case, ``sql/usecase/scores.sql`` (served table, ``_latest`` and
``_history`` views, shadow table, grants) and, when it has a campaign,
``sql/usecase/campaign.sql``, with the names and key type from its config. Nothing is
hand-written per use case.

Before any work, a run checks that its use case's objects exist (:func:`require`) and
refuses with the command that creates them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ConfigError
from pipeline.core.paths import SQL_DIR
from pipeline.store import db

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
CAMPAIGNS = "campaigns"
SHARED = ("ml.runs", "ml.model_versions", "ml.promotions", "monitoring.checks")


@dataclass(frozen=True)
class Expected:
    """One object a use case needs: schema, name, kind (table/view), and its key column."""

    schema: str
    name: str
    kind: str
    key: bool = True

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def objects(uc: UseCase) -> list[Expected]:
    """The serving objects generated for ``uc``."""
    t = uc.score_table
    out = [
        Expected(PREDICTIONS, t, "table"),
        Expected(PREDICTIONS, f"{t}_latest", "view"),
        Expected(PREDICTIONS, f"{t}_history", "view"),
        Expected(PREDICTIONS, f"{t}_shadow", "table"),
    ]
    if uc.campaign is not None:
        c = uc.campaign
        out += [
            Expected(CAMPAIGNS, name, "table")
            for name in (c.audience_table, c.control_table, c.send_log_table, c.opt_outs_table)
        ]
    return out


def _names(uc: UseCase) -> dict[str, Any]:
    t = uc.score_table
    names: dict[str, Any] = {
        "scores": sql.Identifier(PREDICTIONS, t),
        "latest": sql.Identifier(PREDICTIONS, f"{t}_latest"),
        "history": sql.Identifier(PREDICTIONS, f"{t}_history"),
        "shadow": sql.Identifier(PREDICTIONS, f"{t}_shadow"),
        "key": sql.Identifier(uc.entity_key),
        "key_type": sql.SQL(uc.entity.type),
        "probability": sql.Identifier(uc.probability_column),
        "use_case": sql.Literal(uc.name),
    }
    if uc.campaign is not None:
        c = uc.campaign
        names |= {
            "audience": sql.Identifier(CAMPAIGNS, c.audience_table),
            "control_band": sql.Identifier(CAMPAIGNS, c.control_table),
            "send_log": sql.Identifier(CAMPAIGNS, c.send_log_table),
            "send_log_index": sql.Identifier(f"{c.send_log_table}_by_key"),
            "control_band_index": sql.Identifier(f"{c.control_table}_by_key"),
            "opt_outs": sql.Identifier(CAMPAIGNS, c.opt_outs_table),
        }
    return names


def ddl(uc: UseCase) -> list[sql.Composed]:
    """The statements that create ``uc``'s serving objects (idempotent)."""
    names = _names(uc)
    files = ["scores.sql"] + (["campaign.sql"] if uc.campaign is not None else [])
    return [sql.SQL((SQL_DIR / "usecase" / f).read_text()).format(**names) for f in files]


def init(url: str, use_cases: list[UseCase]) -> list[str]:
    """Apply the shared schema, then every use case's objects; returns what was applied.

    Raises:
        ConfigError: an existing served table does not match its use case's config (another
            key column or type); nothing of that use case is changed.
    """
    applied = db.apply_schema(url)
    conn = db.connect(url)
    try:
        for uc in use_cases:
            problems = _mismatches(conn, uc)
            if problems:
                raise ConfigError(
                    f"use case {uc.name!r} ({uc.source}) does not match the serving database: "
                    + "; ".join(problems)
                    + ". Choose another serving.table (or campaign.name), or drop the old "
                    "objects after saving what they hold, then run `nightscore db init` again"
                )
            with conn.cursor() as cur:
                for statement in ddl(uc):
                    cur.execute(statement)
            conn.commit()
            applied.append(f"use case {uc.name}")
            log.info("serving objects of %s: %s", uc.name, [o.qualified for o in objects(uc)])
    finally:
        conn.close()
    return applied


def _mismatches(conn: Any, uc: UseCase) -> list[str]:
    """Existing objects of ``uc`` whose key column is missing or of another type."""
    want = {"bigint": "bigint", "text": "text"}[uc.entity.type]
    problems = []
    with conn.cursor() as cur:
        for obj in objects(uc):
            if obj.kind != "table":
                continue
            cur.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (obj.schema, obj.name),
            )
            columns = dict(cur.fetchall())
            if not columns:
                continue
            found = columns.get(uc.entity_key)
            if found != want:
                problems.append(
                    f"{obj.qualified} exists with key column {uc.entity_key} "
                    f"{found or 'missing'} (columns: {', '.join(sorted(columns))}), the config "
                    f"says {uc.entity_key} {want}"
                )
    conn.commit()
    return problems


def missing(settings: Settings, uc: UseCase) -> list[str]:
    """The shared and use-case objects that do not exist in the serving database."""
    wanted = [*SHARED, *(o.qualified for o in objects(uc))]
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL",
                (wanted,),
            )
            gone = [r[0] for r in cur.fetchall()]
        conn.commit()
    finally:
        conn.close()
    return gone


def require(settings: Settings, uc: UseCase) -> None:
    """Refuse to run ``uc`` before its serving objects exist.

    Raises:
        ConfigError: naming the missing objects and the command that creates them.
    """
    gone = missing(settings, uc)
    if gone:
        raise ConfigError(
            f"the serving database has no {', '.join(gone)} for use case {uc.name!r}: run "
            "`nightscore db init` (it creates every use case's served table, views, shadow "
            "table, campaign tables and grants from usecases/), then run again"
        )
