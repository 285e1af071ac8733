"""Rolling per-entity windows kept from one night to the next (the use case's ``windows``).

A window block declares aggregates of one dated fact table per entity: sums, row counts
and the newest day, each over the ``days`` before the snapshot date D. The features query
reads them as a table named after the block. Recomputing them every night scans
``days`` days of facts (O(population x window)); here they are kept instead:

    state(D) = state(D-1) + the facts of day D-1 - the facts of day D-1-n (each window n)

which reads one state row per entity and a few days of facts (O(population)). A state is
stored per night as Parquet under its date and the hash of its definition, never rewritten
(a snapshot as of D reads only the state as of D, built from facts dated before D), and
trusted only while the warehouse still holds what it was built from: it records, per day
of its fact table, the rows and a fingerprint of their content (``db.fingerprint`` of the
columns the contract declares for the table, the same evidence ``check_sources`` keeps for
``history_unchanged``); a state any of whose days differ now (rows added or removed,
values restated in place) is not used: the windows are rebuilt from the facts, and the
night's log and stage record say which table and days changed. Labelled (training) snapshots always build
them from the facts: they are built once and reused.

On a PostgreSQL warehouse the windows are a temporary table of the feature query's session
(the warehouse needs no write access, only PostgreSQL's default TEMP privilege); on another
warehouse they are a common table expression computed from the facts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from psycopg2 import sql

from pipeline import db, files
from pipeline.config import Settings
from pipeline.errors import DataError, SourceError
from pipeline.usecase import UseCase, Window

log = logging.getLogger(__name__)

ROLL_LIMIT = 7  # a stored state is rolled forward by at most this many days
KEEP_DAYS = 7  # states older than the newest by more than this are removed
ROWS = "nightscore_rows"  # rows of the longest window: an entity without any leaves
_INTEGERS = {"smallint", "integer", "bigint"}


def _q(name: str) -> str:
    return db.quote_ident(name)


def _day(offset: int) -> str:
    return f"CAST(:as_of AS date) - {offset}"


def facts_sql(w: Window, key: str) -> str:
    """The windows as of ``:as_of`` from the facts: every row of the longest window."""
    d = _q(w.date)
    cols = []
    for agg_name, a in w.aggregates.items():
        within = f"FILTER (WHERE {d} >= {_day(a.days)})"
        if a.kind == "sum":
            expr = f"CAST(coalesce(sum({_q(a.sum or '')}) {within}, 0) AS bigint)"
        elif a.kind == "count":
            expr = f"count(*) {within}"
        else:
            expr = f"max({d}) {within}"
        cols.append(f"{expr} AS {_q(agg_name)}")
    return (
        f"SELECT {_q(key)}, {', '.join(cols)}, count(*) AS {ROWS}\n"
        f"FROM {_q(w.table)}\n"
        f"WHERE {d} >= {_day(w.days)} AND {d} < :as_of\n"
        f"GROUP BY {_q(key)}"
    )


def step_sql(w: Window, key: str, previous: str) -> str:
    """The windows as of ``:as_of`` from ``previous`` (the windows as of the day before):
    the day entering every window added, the day leaving each window taken away."""
    d, k = _q(w.date), _q(key)
    leaving = sorted({a.days for a in w.aggregates.values()} | {w.days})
    days = ", ".join([_day(1)] + [_day(n + 1) for n in leaving])
    moved = [
        f"count(*) FILTER (WHERE {d} = {_day(1)}) AS in_rows",
        *(f"count(*) FILTER (WHERE {d} = {_day(n + 1)}) AS out_rows_{n}" for n in leaving),
    ]
    out = []
    for i, (agg_name, a) in enumerate(w.aggregates.items()):
        if a.kind == "sum":
            col = _q(a.sum or "")
            moved += [
                f"sum({col}) FILTER (WHERE {d} = {_day(1)}) AS in_{i}",
                f"sum({col}) FILTER (WHERE {d} = {_day(a.days + 1)}) AS out_{i}",
            ]
            expr = (
                f"CAST(coalesce(s.{_q(agg_name)}, 0) + coalesce(k.in_{i}, 0) "
                f"- coalesce(k.out_{i}, 0) AS bigint)"
            )
        elif a.kind == "count":
            expr = (
                f"coalesce(s.{_q(agg_name)}, 0) + coalesce(k.in_rows, 0) "
                f"- coalesce(k.out_rows_{a.days}, 0)"
            )
        else:
            expr = (
                f"CASE WHEN k.in_rows > 0 THEN CAST({_day(1)} AS date) "
                f"WHEN s.{_q(agg_name)} >= {_day(a.days)} THEN s.{_q(agg_name)} END"
            )
        out.append(f"{expr} AS {_q(agg_name)}")
    rows = f"coalesce(s.{ROWS}, 0) + coalesce(k.in_rows, 0) - coalesce(k.out_rows_{w.days}, 0)"
    return (
        f"WITH k AS (\n  SELECT {k}, {', '.join(moved)}\n  FROM {_q(w.table)}\n"
        f"  WHERE {d} IN ({days})\n  GROUP BY {k}\n)\n"
        f"SELECT coalesce(s.{k}, k.{k}) AS {k}, {', '.join(out)}, {rows} AS {ROWS}\n"
        f"FROM {previous} s FULL JOIN k ON k.{k} = s.{k}\n"
        f"WHERE {rows} > 0"
    )


def inline(uc: UseCase) -> list[str]:
    """``name AS (...)`` of each window, from the facts, for a WITH clause."""
    return [f"{_q(n)} AS (\n{facts_sql(w, uc.entity_key)}\n)" for n, w in uc.windows.items()]


def definition(uc: UseCase) -> str:
    """What the windows are made of (part of a snapshot's definition hash)."""
    return "\n".join(_definition(w, uc.entity_key) for w in uc.windows.values())


def _definition(w: Window, key: str) -> str:
    return facts_sql(w, key) + "\n" + step_sql(w, key, "previous")


def can_keep(url: str) -> bool:
    """Whether the warehouse takes the windows as temporary tables: PostgreSQL, and not
    read-only (a hot standby, or ``default_transaction_read_only``); else they are CTEs
    over the facts."""
    if not db.is_postgres(url):
        return False
    read_only = db.scalar(url, "SHOW transaction_read_only") == "on"
    if read_only:
        log.info("the warehouse is read-only: windows are computed from the facts, not kept")
    return not read_only


@dataclass(frozen=True)
class Built:
    """How a window table of one snapshot was made: ``stored`` (tonight's state, as kept),
    ``rolled`` (a kept state moved forward ``days`` days), or ``facts``; ``changed``: the
    days of its table that no longer hold what a kept state was built from."""

    name: str
    how: str
    days: int = 0
    changed: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}: {self.how}" + (f" {self.days} day(s)" if self.how == "rolled" else "")

    def describe(self) -> str:
        """How it was made, and why a kept state was not used, for the night's record."""
        if not self.changed:
            return str(self)
        return f"{self}, the kept state disagreeing with the facts: {'; '.join(self.changed)}"


def prepare(cur: Any, settings: Settings, uc: UseCase, as_of: date, keep: bool) -> list[Built]:
    """Create each window of ``uc`` as a temporary table as of ``as_of`` in the session of
    ``cur`` (an ADBC cursor on the warehouse, search path set).

    With ``keep``, the newest state kept by an earlier night (up to ``ROLL_LIMIT`` days
    old) is rolled forward if the warehouse still counts its days the same (counted on a
    second connection meanwhile), else the windows come from the facts; tonight's state
    is kept for the next night. Without ``keep``, from the facts, and nothing is kept.
    """
    built = []
    for name, w in uc.windows.items():
        _check_columns(cur, settings, uc, name, w)
        if not keep:
            _from_facts(cur, uc, name, w, as_of)
            built.append(Built(name, "facts"))
            continue
        folder = _folder(settings, uc, name, w)
        state = _newest(folder, w, as_of)
        since = (state.as_of if state is not None else as_of) - timedelta(days=w.days)
        columns = evidence_columns(uc, w)
        with ThreadPoolExecutor(1) as pool:
            counting = pool.submit(_day_evidence, settings, w, columns, since, as_of)
            how = (
                _roll(cur, uc, name, w, state, as_of)
                if state
                else _from_facts(cur, uc, name, w, as_of)
            )
            evidence = counting.result()
        changed = state.disagreements(evidence) if state is not None else []
        if changed:
            _execute(cur, f"DROP TABLE {_q(name)}", as_of)
            how = Built(name, "facts", changed=tuple(changed))
            _from_facts(cur, uc, name, w, as_of)
            log.warning(
                "windows %s of %s as of %s: %s changed since the kept state was built (%s): "
                "rebuilt from the facts",
                name,
                uc.name,
                as_of,
                w.table,
                "; ".join(changed),
            )
        if how.how != "stored":
            _keep(cur, uc, name, w, folder, as_of, evidence)
        log.info("windows %s as of %s: %s", uc.name, as_of, how)
        built.append(how)
    return built


def _from_facts(cur: Any, uc: UseCase, name: str, w: Window, as_of: date) -> Built:
    _execute(cur, f"CREATE TEMP TABLE {_q(name)} AS {facts_sql(w, uc.entity_key)}", as_of)
    return Built(name, "facts")


def _roll(cur: Any, uc: UseCase, name: str, w: Window, state: Kept, as_of: date) -> Built:
    """The temporary table ``name``: the kept ``state``, rolled forward to ``as_of``."""
    cur.adbc_ingest(
        f"nightscore_{name}_0", pq.read_table(state.path), mode="create", temporary=True
    )
    steps = (as_of - state.as_of).days
    for i in range(1, steps + 1):
        target, previous = f"nightscore_{name}_{i}", f"nightscore_{name}_{i - 1}"
        step = f"CREATE TEMP TABLE {target} AS {step_sql(w, uc.entity_key, previous)}"
        _execute(cur, step, state.as_of + timedelta(days=i))
        _execute(cur, f"DROP TABLE {previous}", as_of)
    _execute(cur, f"ALTER TABLE nightscore_{name}_{steps} RENAME TO {_q(name)}", as_of)
    return Built(name, "stored") if steps == 0 else Built(name, "rolled", steps)


def _execute(cur: Any, text: str, as_of: date) -> None:
    query, values = db.positional(text, {"as_of": as_of} if ":as_of" in text else {})
    cur.execute(query, parameters=values or None)


def _check_columns(cur: Any, settings: Settings, uc: UseCase, name: str, w: Window) -> None:
    """The date column is a date; summed columns are integers (so a kept sum stays exact)."""
    cur.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = $2",
        parameters=(settings.warehouse_schema, w.table),
    )
    found = dict(cur.fetchall())
    where = f"windows.{name} of {uc.source}"
    schema = settings.warehouse_schema
    if not found:
        raise db.missing_table(w.table, schema, f"{where} reads it")
    wanted = {w.date: {"date"}} | {
        a.sum: _INTEGERS for a in w.aggregates.values() if a.sum is not None
    }
    for column, kinds in wanted.items():
        if column not in found:
            raise SourceError(
                f"source column {column!r} not found in {schema}.{w.table}: {where} reads "
                f"it; the table has {', '.join(sorted(found))}"
            )
        if found[column] not in kinds:
            raise DataError(
                f"{where}: {settings.warehouse_schema}.{w.table}.{column} should be "
                f"{' or '.join(sorted(kinds))}, found {found[column]}; "
                "windows sum integer columns by calendar date (cast others in the features "
                "SQL, from the facts)"
            )


def evidence_columns(uc: UseCase, w: Window) -> list[str]:
    """The columns whose content a kept state vouches for: those the source contract
    declares for its table (the same evidence as ``check_sources`` keeps), else the entity
    key, the date and the summed columns."""
    from pipeline.contract import load_contract

    declared = load_contract(uc.contract).tables.get(w.table)
    if declared is not None and declared.columns:
        return list(declared.columns)
    summed = [a.sum for a in w.aggregates.values() if a.sum is not None]
    return list(dict.fromkeys([uc.entity_key, w.date, *summed]))


Evidence = dict[date, list[Any]]  # per day: [rows, content fingerprint]


def _day_evidence(
    settings: Settings, w: Window, columns: list[str], since: date, before: date
) -> Evidence:
    """Per day of ``w.table`` in [since, before): rows and a fingerprint of ``columns``, on
    a connection of its own."""
    query = sql.SQL(
        "SELECT {d}, count(*), {f} FROM {t} WHERE {d} >= %s AND {d} < %s GROUP BY 1"
    ).format(
        d=sql.Identifier(w.date),
        f=db.fingerprint(columns),
        t=sql.Identifier(settings.warehouse_schema, w.table),
    )
    conn = db.connect(settings.warehouse_url)
    try:
        with conn.cursor() as c:
            c.execute(query, (since, before))
            return {db.to_date(d): [int(n), str(f)] for d, n, f in c.fetchall()}
    finally:
        conn.close()


def _folder(settings: Settings, uc: UseCase, name: str, w: Window) -> Path:
    sha = hashlib.sha256(_definition(w, uc.entity_key).encode()).hexdigest()
    return settings.snapshots / uc.name / "windows" / name / sha[:12]


@dataclass(frozen=True)
class Kept:
    """A state kept by an earlier night: its date, file, and per day it was built from (the
    days of its longest window) the rows and their content fingerprint."""

    as_of: date
    path: Path
    days: Evidence
    span: int

    def disagreements(self, evidence: Evidence, shown: int = 5) -> list[str]:
        """The days whose rows or content differ in the warehouse now (``evidence``), said
        in words (at most ``shown``, then how many more); empty when every day agrees."""
        start = self.as_of - timedelta(days=self.span)
        days = [start + timedelta(days=i) for i in range(self.span)]
        none = [0, "0"]
        changed = [d for d in days if self.days.get(d, none) != evidence.get(d, none)]
        out = []
        for d in changed[:shown]:
            was, now = self.days.get(d, none)[0], evidence.get(d, none)[0]
            out.append(
                f"{d}: {was:,} -> {now:,} rows"
                if was != now
                else f"{d}: {now:,} rows, content changed"
            )
        if len(changed) > shown:
            out.append(f"and {len(changed) - shown} more days")
        return out


def _newest(folder: Path, w: Window, as_of: date) -> Kept | None:
    """The newest kept state as of ``as_of`` or up to ``ROLL_LIMIT`` days before whose
    bytes match their hash."""
    for back in range(ROLL_LIMIT + 1):
        day = as_of - timedelta(days=back)
        for path in sorted((folder / f"as_of={day}").glob("*.parquet")):
            if files.sha256(path)[:16] != path.stem:
                log.warning("kept windows %s do not match their content hash; not used", path)
                continue
            meta = pq.read_schema(path).metadata or {}
            # a state kept before content fingerprints has none: it never agrees, once
            days = json.loads(meta.get(b"nightscore_day_evidence", b"{}"))
            return Kept(
                day,
                path,
                {date.fromisoformat(d): list(e) for d, e in days.items()},
                w.days,
            )
    return None


def _keep(
    cur: Any,
    uc: UseCase,
    name: str,
    w: Window,
    folder: Path,
    as_of: date,
    evidence: Evidence,
) -> None:
    """Write the windows as of ``as_of`` (the temporary table ``name``) to the state store,
    with the evidence of the days they were built from."""
    cur.execute(f"SELECT * FROM {_q(name)} ORDER BY {_q(uc.entity_key)}")
    table = cur.fetch_arrow_table()
    start = as_of - timedelta(days=w.days)
    days = {str(d): e for d, e in sorted(evidence.items()) if start <= d < as_of}
    table = table.replace_schema_metadata(
        {"nightscore_as_of": str(as_of), "nightscore_day_evidence": json.dumps(days)}
    )
    target = folder / f"as_of={as_of}"
    target.mkdir(parents=True, exist_ok=True)
    files.sweep(target)
    tmp = files.temporary(target / "state.parquet")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, target / f"{files.sha256(tmp)[:16]}.parquet")
    _prune(folder, as_of)


def _prune(folder: Path, newest: date) -> None:
    for old in folder.glob("as_of=*"):
        if date.fromisoformat(old.name.removeprefix("as_of=")) < newest - timedelta(days=KEEP_DAYS):
            shutil.rmtree(old, ignore_errors=True)
