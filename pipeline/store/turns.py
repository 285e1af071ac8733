"""One night of a use case at a time: scheduled, triggered and backfilled runs take turns.

Airflow's ``max_active_runs`` keeps a DAG's scheduled runs apart but not its backfill
runs, and two nights of one use case side by side would race on what they share (the
registry, the kept windows and source evidence, the served table's newest night). A run
takes the use case's turn before it starts (``take``) and gives it back once its report
is written (``give_back``); a run whose turn is held by another live run waits. The turn is
a row of ``ml.night_turns`` locked only for the instant of taking it (a reader has no
privilege on ``ml``, so no reader can hold it), and a holder that died without giving it
back (its process killed, its run marked failed) loses it: the caller says which runs are
alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from pipeline.conf.config import Settings
from pipeline.store import db, locks

log = logging.getLogger(__name__)


def take(
    settings: Settings, use_case: str, run_id: str, alive: Callable[[str], bool]
) -> str | None:
    """Take ``use_case``'s turn for ``run_id`` (or keep it, if it holds it already).

    Args:
        alive: whether the run of a given id is still running (Airflow's view of it).

    Returns:
        None once the turn is this run's; else why it waits (the run that holds it, and
        since when), to be tried again later.
    """
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            locks.lock(cur, f"turn.{use_case}", what=f"run {run_id} taking the turn of {use_case}")
            cur.execute(
                "INSERT INTO ml.night_turns (use_case) VALUES (%s) ON CONFLICT DO NOTHING",
                (use_case,),
            )
            cur.execute(
                "SELECT run_id, taken_at FROM ml.night_turns WHERE use_case = %s", (use_case,)
            )
            holder, since = cur.fetchone()
            if holder is not None and holder != run_id and alive(holder):
                conn.rollback()
                return _waiting(use_case, holder, since)
            cur.execute(
                "UPDATE ml.night_turns SET run_id = %s, taken_at = now() WHERE use_case = %s",
                (run_id, use_case),
            )
        conn.commit()
    finally:
        conn.close()
    if holder is not None and holder != run_id:
        log.warning(
            "%s: run %s took the turn of run %s, which is no longer running",
            use_case,
            run_id,
            holder,
        )
    return None


def holder(settings: Settings, use_case: str) -> tuple[str, datetime | None] | None:
    """The run holding ``use_case``'s turn and since when, or None when nobody does.

    A holder Airflow no longer runs is still named here: it loses the turn only when the
    next run tries to take it.
    """
    rows = db.records(
        settings.database_url,
        "SELECT run_id, taken_at FROM ml.night_turns WHERE use_case = %s AND run_id IS NOT NULL",
        (use_case,),
    )
    return (rows[0]["run_id"], rows[0]["taken_at"]) if rows else None


def _waiting(use_case: str, holder: str, since: datetime | None) -> str:
    held = f" since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
    return (
        f"waiting for run {holder} of {use_case}, which holds the use case's turn{held}: "
        "one night of a use case runs at a time (scheduled, triggered and backfilled alike)"
    )


def give_back(settings: Settings, use_case: str, run_id: str) -> bool:
    """Give ``use_case``'s turn back if ``run_id`` holds it; True if it did."""
    released = db.scalar(
        settings.database_url,
        "WITH r AS (UPDATE ml.night_turns SET run_id = NULL, taken_at = NULL "
        "WHERE use_case = %s AND run_id = %s RETURNING 1) SELECT count(*) FROM r",
        (use_case, run_id),
    )
    return bool(released)
