"""Content fingerprints (``db.fingerprint``): what changes them, and what does not."""

from __future__ import annotations

from datetime import date

import psycopg2
from psycopg2 import sql

from pipeline.conf.config import Settings
from pipeline.stages import source_days
from pipeline.store import db

TYPES = {"k": "integer", "t": "text", "j": "json", "p": "point"}


Row = tuple[int, str | None, str, str]
A: Row = (1, "a", '{"x": 1}', "(1,2)")
B: Row = (2, "b", "[]", "(0,0)")


def _fingerprints(settings: Settings, groups: list[list[Row]], record_hash: bool) -> list[str]:
    """The fingerprint of each group of rows (k, t, j, p)."""
    conn = psycopg2.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE fp (g int, k integer, t text, j json, p point)")
            for g, rows in enumerate(groups):
                for row in rows:
                    cur.execute("INSERT INTO fp VALUES (%s, %s, %s, %s, %s)", (g, *row))
            cur.execute(
                sql.SQL("SELECT g, {} FROM fp GROUP BY g ORDER BY g").format(
                    db.fingerprint(list(TYPES), TYPES, record_hash)
                )
            )
            return [f for _, f in cur.fetchall()]
    finally:
        conn.close()


def test_a_fingerprint_sees_a_value_changed_a_null_and_a_type_without_a_hash(
    settings: Settings,
) -> None:
    groups = [
        [A, B],
        [B, A],  # reordered: the same
        [(1, "a", '{"x": 2}', "(1,2)"), B],  # json changed
        [(1, "a", '{"x": 1}', "(1,3)"), B],  # point changed
        [(1, "", '{"x": 1}', "(1,2)"), B],  # '' for 'a'
        [(1, None, '{"x": 1}', "(1,2)"), B],  # NULL for 'a'
        [(1, "b", '{"x": 1}', "(1,2)"), (2, "a", "[]", "(0,0)")],  # values swapped
    ]
    for record_hash in (True, False):
        found = _fingerprints(settings, groups, record_hash)
        assert found[0] == found[1]
        assert len(set(found[1:])) == len(groups) - 1, (record_hash, found)
        assert all(f.startswith(db.RECORD_HASH) == record_hash for f in found)


def test_history_compares_content_only_between_fingerprints_made_the_same_way() -> None:
    from pipeline.conf.contract import load_contract
    from pipeline.conf.usecase import load

    contract = load_contract(load("churn").contract)
    day = date(2025, 3, 1)
    earlier = {"usage_daily": {day: (100, "12345")}}  # an earlier version's fingerprint
    same_rows = {"usage_daily": {day: (100, "r999")}}
    out = source_days.rewritten_days(earlier, date(2025, 3, 5), same_rows, "wh", contract)
    assert [r.passed for r in out] == [True]
    restated = {"usage_daily": {day: (100, "r1")}}
    again = source_days.rewritten_days(same_rows, date(2025, 3, 5), restated, "wh", contract)
    assert [r.passed for r in again] == [False]
    assert "content changed" in again[0].found
