"""Per-entity state kept from one night to the next: the use case's ``windows`` and ``states``.

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

A ``states`` block is the same idea with SQL the use case writes: ``facts`` (the block
as of ``:as_of`` from the facts) and ``step`` (the block as of ``:as_of`` from the block as
of the day before, which it reads under the block's own name, and the facts that changed
that day), for aggregates a rolling sum cannot express (the newest row per entity, an
invoice's status as of D). It is kept and trusted by the same rules, over the days of each
table it names; and since its step is the use case's, not generated, every night that
rolls one recomputes a slice of its entities (1 in ``SLICES``, a different slice each
night) from the facts and compares: a step that disagrees is not used (the block is rebuilt
from the facts, and the log and the night's record name the entity and column).

On a PostgreSQL warehouse each block is a temporary table of the feature query's session (the
warehouse needs no write access, only PostgreSQL's default TEMP privilege); kept blocks are
rolled at once, each on a connection of its own, and handed to that session. On another
warehouse they are a common table expression computed from the facts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg2 import sql

from pipeline.conf.config import Settings
from pipeline.conf.sections import Window
from pipeline.conf.usecase import UseCase
from pipeline.core import files
from pipeline.core.errors import DataError, SourceError
from pipeline.stages.rolling import facts_sql, moved_sql, roll
from pipeline.store import db

log = logging.getLogger(__name__)

ROLL_LIMIT = 7  # a stored state is rolled forward by at most this many days
KEEP_DAYS = 7  # states older than the newest by more than this are removed
_INTEGERS = {"smallint", "integer", "bigint"}


def _q(name: str) -> str:
    return db.quote_ident(name)


@dataclass(frozen=True)
class Source:
    """A table a block is built from: its date column and the days before the snapshot
    date it reads (``None``: every day); ``sums``: columns that must be integers."""

    table: str
    date: str
    days: int | None
    sums: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """One kept block: its SQL as of ``:as_of`` from the facts, its step (a state's: the
    block as of ``:as_of`` from the block as of the day before, read under its own name;
    windows': :func:`moved_sql`), the tables it is built from, and whether
    a slice of it is recomputed each night (a step the use case wrote)."""

    name: str
    facts: str
    step: str
    sources: tuple[Source, ...]
    verified: bool
    window: Window | None = None  # a generated block's spec: rolled outside the warehouse

    @property
    def definition(self) -> str:
        """What the block is made of (its state folder, part of a snapshot's hash)."""
        spans = ", ".join(f"{s.table}.{s.date} {s.days or 'all'} days" for s in self.sources)
        return f"{self.facts}\n{self.step}\n{spans}"


def blocks(uc: UseCase) -> list[Block]:
    """The use case's windows and states, as blocks."""
    key = uc.entity_key
    out = [
        Block(
            n,
            facts_sql(w, key),
            moved_sql(w, key),
            (
                Source(
                    w.table, w.date, w.days, tuple(a.sum for a in w.aggregates.values() if a.sum)
                ),
            ),
            verified=False,  # generated: tests/integration/test_windows.py holds it to the facts
            window=w,
        )
        for n, w in uc.windows.items()
    ]
    for n, st in uc.states.items():
        out.append(
            Block(
                n,
                db.statement(st.facts.read_text()),
                db.statement(st.step.read_text()),
                tuple(Source(t, spec.date, spec.days) for t, spec in st.tables.items()),
                verified=True,
            )
        )
    return out


def spans(uc: UseCase) -> dict[str, int]:
    """Per table the blocks are built from, the most days before a run date whose evidence
    they compare: the days they read, and the day before them (which last night's state
    read), or every day a table holds (``contract.ALL_HISTORY``)."""
    from pipeline.conf.contract import ALL_HISTORY

    out: dict[str, int] = {}
    for b in blocks(uc):
        for src in b.sources:
            days = src.days + 1 if src.days is not None else ALL_HISTORY
            out[src.table] = max(out.get(src.table, 0), days)
    return out


def inline(uc: UseCase) -> list[str]:
    """``name AS (...)`` of each block, from the facts, for a WITH clause."""
    return [f"{_q(b.name)} AS (\n{b.facts}\n)" for b in blocks(uc)]


def definition(uc: UseCase) -> str:
    """What the blocks are made of (part of a snapshot's definition hash)."""
    return "\n".join(b.definition for b in blocks(uc))


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
    """How a block of one snapshot was made: ``stored`` (tonight's state, as kept),
    ``rolled`` (a kept state moved forward ``days`` days), or ``facts``; ``changed``: why a
    kept state was not used (the days of its tables that no longer hold what it was built
    from, or the entities where its step disagreed with the facts)."""

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


Evidence = dict[date, list[Any]]  # per day: [rows, content fingerprint]
# What an earlier stage of the night saw of each table: since which day, and per day.
Seen = Mapping[str, tuple[date, Mapping[date, Sequence[Any]]]]


WORKERS = 3  # blocks built at once, each on a warehouse connection of its own


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made: how each block was made, in the use case's order, and the
    key halfway through the first block's rows (None: not kept), where the feature query
    may be cut in two."""

    built: list[Built]
    middle: Any = None


def prepare(
    cur: Any,
    settings: Settings,
    uc: UseCase,
    as_of: date,
    keep: bool,
    seen: Seen | None = None,
    also: Sequence[Any] = (),
) -> Prepared:
    """Create each block of ``uc`` (windows and states) as a temporary table as of
    ``as_of`` in the session of ``cur`` (an ADBC cursor on the warehouse, search path set)
    and, with ``keep``, in each session of ``also`` too.

    With ``keep``, the blocks are built at once (up to ``WORKERS``), each on a warehouse
    connection of its own, and each handed to the sessions of ``cur`` and ``also`` as soon
    as it is ready: rolling one block does not wait for the others. Without it they are
    built from the facts in the session of ``cur``, one after the other: those scans
    already run on the server's parallel workers, and at once they only contend (45 s
    against 54 s for a training snapshot at 1M, docs/scaling.md).

    With ``keep``, the newest state kept by an earlier night (up to ``ROLL_LIMIT`` days
    old) is rolled forward if the warehouse still holds the days it was built from
    (counted on a second connection meanwhile) and, for a state, a slice of it agrees with
    the facts; else the block comes from the facts. Tonight's state is kept for the next
    night. Without ``keep``, from the facts, and nothing is kept.

    ``seen``: the rows and content per day of the tables as the night's source checks
    counted them (``check_sources`` keeps the same evidence, of the same columns): used
    instead of counting again where it covers the days a block needs.
    """
    todo = blocks(uc)
    if not keep:
        built = []
        for block in todo:
            _check_columns(cur, settings, uc, block)
            built.append(_made(uc, as_of, _from_facts(cur, block, as_of)))
        return Prepared(built)
    made: dict[str, Built] = {}
    middle = None
    sessions = [cur, *also]
    with (
        ThreadPoolExecutor(max(1, min(WORKERS, len(todo)))) as pool,
        ThreadPoolExecutor(len(sessions)) as handing,
    ):
        building = {pool.submit(_build, settings, uc, b, as_of, seen): b for b in todo}
        try:
            for done in as_completed(building):
                if done.exception() is not None:
                    break
                block = building[done]
                how, table = done.result()
                for handed in [handing.submit(_hand, c, block, table, as_of) for c in sessions]:
                    handed.result()
                made[block.name] = how
                if block is todo[0] and table.num_rows:
                    middle = table.column(uc.entity_key)[table.num_rows // 2].as_py()
        finally:
            for f in building:
                f.cancel()
    for f in building:  # the error of the first block, in the use case's order, that failed
        error = None if f.cancelled() else f.exception()
        if error is not None:
            raise error
    return Prepared([made[b.name] for b in todo], middle)


def _hand(cur: Any, block: Block, table: pa.Table, as_of: date) -> None:
    """``block``'s rows as a temporary table of the session of ``cur``, analyzed."""
    cur.adbc_ingest(block.name, table, mode="create", temporary=True)
    _execute(cur, f"ANALYZE {_q(block.name)}", as_of)


def _build(
    settings: Settings, uc: UseCase, block: Block, as_of: date, seen: Seen | None
) -> tuple[Built, pa.Table]:
    """``block`` as of ``as_of``, made on a warehouse connection of its own and kept: how it
    was made, and its rows in key order."""
    import adbc_driver_manager

    conn = db.adbc_connect(settings.warehouse_url)
    try:
        cur = conn.cursor()
        db.set_search_path(cur, settings.warehouse_schema)
        db.apply_settings(cur, uc.warehouse.settings, f"{uc.source}: warehouse.session")
        how, evidence, table = _make(cur, settings, uc, block, as_of, seen)
        if table is None:  # made in the worker's session
            cur.execute(f"SELECT * FROM {_q(block.name)} ORDER BY {_q(uc.entity_key)}")
            table = cur.fetch_arrow_table()
        if how.how != "stored":
            _keep(table, block, _folder(settings, uc, block), as_of, evidence)
        return _made(uc, as_of, how), table
    except adbc_driver_manager.Error as exc:
        raise db.source_error(exc, settings.warehouse_schema) from exc
    finally:
        conn.close()


def _made(uc: UseCase, as_of: date, how: Built) -> Built:
    log.info("windows %s as of %s: %s", uc.name, as_of, how)
    return how


def _make(
    cur: Any,
    settings: Settings,
    uc: UseCase,
    block: Block,
    as_of: date,
    seen: Seen | None,
) -> tuple[Built, dict[str, Evidence], pa.Table | None]:
    """``block`` from the state an earlier night kept, else from the facts (:func:`prepare`'s
    rules): how it was made, the evidence of the days it was built from, and its rows when
    they were made outside ``cur``'s session (None: a temporary table there holds them).

    A state kept tonight is read as it is; generated windows are rolled outside the
    warehouse (:func:`roll_in_arrow`: only the days that move are read from it); a state
    the use case steps is rolled in ``cur``'s session, where its step SQL runs."""
    columns = _check_columns(cur, settings, uc, block)
    state = _newest(_folder(settings, uc, block), block, as_of)
    since = state.as_of if state is not None else as_of
    given = _given(block, seen, since, as_of)
    log.info(
        "kept %s as of %s: the evidence of its days %s",
        block.name,
        as_of,
        "counted" if given is None else "from the night's source checks",
    )
    with ThreadPoolExecutor(1) as pool:
        counting = None
        if given is None:
            counting = pool.submit(_evidence, settings, block, columns, since, as_of)
        table = None
        if state is None:
            how = _from_facts(cur, block, as_of)
        elif state.as_of == as_of:
            how, table = Built(block.name, "stored"), pq.read_table(state.path)
        elif block.window is not None:
            table = roll_in_arrow(cur, block, uc.entity_key, state, as_of)
            how = Built(block.name, "rolled", (as_of - state.as_of).days)
        else:
            how = _roll(cur, block, state, as_of)
        evidence = counting.result() if counting is not None else given or {}
    changed = state.disagreements(evidence) if state is not None else []
    if changed:
        log.warning(
            "%s %s of %s as of %s: %s changed since the kept state was built (%s): "
            "rebuilt from the facts",
            _kind(block),
            block.name,
            uc.name,
            as_of,
            ", ".join(s.table for s in block.sources),
            "; ".join(changed),
        )
    elif block.verified and how.how == "rolled":
        changed = _verify(cur, uc, block, as_of)
        if changed:
            log.warning(
                "state %s of %s as of %s: its step disagrees with its facts SQL on the "
                "slice of entities checked tonight (%s): rebuilt from the facts; fix %s",
                block.name,
                uc.name,
                as_of,
                "; ".join(changed),
                uc.states[block.name].step.name,
            )
    if changed:
        if table is None:
            _execute(cur, f"DROP TABLE {_q(block.name)}", as_of)
        _from_facts(cur, block, as_of)
        how, table = Built(block.name, "facts", changed=tuple(changed)), None
    return how, evidence, table


def _kind(block: Block) -> str:
    return "state" if block.verified else "windows"


def _from_facts(cur: Any, block: Block, as_of: date) -> Built:
    _execute(cur, f"CREATE TEMP TABLE {_q(block.name)} AS {block.facts}", as_of)
    _execute(cur, f"ANALYZE {_q(block.name)}", as_of)
    return Built(block.name, "facts")


def _roll(cur: Any, block: Block, state: Kept, as_of: date) -> Built:
    """The temporary table of ``block`` in a worker's session: the kept ``state``, rolled
    forward to ``as_of``; each step reads the table as of the day before under the block's
    name. Not analyzed at the end: the feature session analyzes its own copy."""
    name = _q(block.name)
    cur.adbc_ingest(block.name, pq.read_table(state.path), mode="create", temporary=True)
    steps = (as_of - state.as_of).days
    for i in range(1, steps + 1):
        _execute(cur, f"ANALYZE {name}", as_of)
        step = f"CREATE TEMP TABLE nightscore_next AS {block.step}"
        _execute(cur, step, state.as_of + timedelta(days=i))
        _execute(cur, f"DROP TABLE {name}", as_of)
        _execute(cur, f"ALTER TABLE nightscore_next RENAME TO {name}", as_of)
    return Built(block.name, "rolled", steps)


def roll_in_arrow(cur: Any, block: Block, key: str, state: Kept, as_of: date) -> pa.Table:
    """The kept windows ``state`` of ``block`` rolled forward to ``as_of`` outside the
    warehouse: per day, the rows of the days entering and leaving the windows, read as they
    are (its step, :func:`rolling.moved_sql`), counted and summed per entity and added to
    and taken from the kept sums, counts and newest days (:func:`rolling.roll`). The kept
    rows never go to the warehouse and back: at 1M entities that round trip cost more than
    the rows of the days that moved (docs/scaling.md)."""
    assert block.window is not None  # a generated block: its step is moved_sql
    table = pq.read_table(state.path).replace_schema_metadata(None)
    for i in range(1, (as_of - state.as_of).days + 1):
        day = state.as_of + timedelta(days=i)
        _execute(cur, block.step, day)
        table = roll(block.window, key, table, cur.fetch_arrow_table(), day)
    return table


def _execute(cur: Any, text: str, as_of: date) -> None:
    query, values = db.positional(text, {"as_of": as_of} if ":as_of" in text else {})
    cur.execute(query, parameters=values or None)


SLICES = 64  # a rolled state's step is checked against the facts on 1 entity in SLICES


def _slice(key: str, as_of: date) -> str:
    """The entities whose state is recomputed from the facts tonight: a hash slice of the
    keys, a different one each night (every entity within ``SLICES`` nights)."""
    return (
        f"(hashtextextended(CAST({key} AS text), 0) & {SLICES - 1}) = {as_of.toordinal() % SLICES}"
    )


def _verify(cur: Any, uc: UseCase, block: Block, as_of: date, shown: int = 3) -> list[str]:
    """Where tonight's slice of the rolled ``block`` differs from its facts SQL, in words;
    empty when they agree row for row."""
    key = _q(uc.entity_key)
    ordered = f"ORDER BY {key}"
    _execute(
        cur, f"SELECT * FROM {_q(block.name)} s WHERE {_slice('s.' + key, as_of)} {ordered}", as_of
    )
    rolled = cur.fetch_arrow_table()
    _execute(
        cur, f"SELECT * FROM ({block.facts}) f WHERE {_slice('f.' + key, as_of)} {ordered}", as_of
    )
    facts = cur.fetch_arrow_table()
    where = f"{rolled.num_rows:,} entities checked"
    if rolled.schema.names != facts.schema.names or rolled.schema.types != facts.schema.types:
        return [
            f"its step gives the columns {_columns(rolled)}, its facts SQL {_columns(facts)} "
            f"({where})"
        ]
    a, b = rolled.to_pydict(), facts.to_pydict()
    if a[uc.entity_key] != b[uc.entity_key]:
        only = sorted(set(a[uc.entity_key]) ^ set(b[uc.entity_key]))
        return [
            f"{len(only):,} {uc.entity_key} in one and not the other, e.g. "
            f"{', '.join(map(str, only[:shown]))} ({where})"
        ]
    out = []
    for column in rolled.schema.names:
        wrong = [i for i, (x, y) in enumerate(zip(a[column], b[column], strict=True)) if x != y]
        if wrong:
            i = wrong[0]
            out.append(
                f"{column} differs for {len(wrong):,} of {where}, e.g. {uc.entity_key} "
                f"{a[uc.entity_key][i]}: {a[column][i]!r} rolled, {b[column][i]!r} from the facts"
            )
    return out


def _columns(table: Any) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in table.schema)


@dataclass(frozen=True)
class Columns:
    """The columns of a table whose content a kept state vouches for, and the table's
    column types (information_schema's names)."""

    names: list[str]
    types: dict[str, str]


def _check_columns(cur: Any, settings: Settings, uc: UseCase, block: Block) -> dict[str, Columns]:
    """Each table of ``block`` exists with its date column a date and its summed columns
    integers (so a kept sum stays exact). Returns, per table, the columns whose content a
    kept state vouches for."""
    out = {}
    for src in block.sources:
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
            parameters=(settings.warehouse_schema, src.table),
        )
        found = dict(cur.fetchall())
        where = f"{'states' if block.verified else 'windows'}.{block.name} of {uc.source}"
        schema = settings.warehouse_schema
        if not found:
            raise db.missing_table(src.table, schema, f"{where} reads it")
        wanted = {src.date: {"date"}} | {c: _INTEGERS for c in src.sums}
        for column, kinds in wanted.items():
            if column not in found:
                raise SourceError(
                    f"source column {column!r} not found in {schema}.{src.table}: {where} "
                    f"reads it; the table has {', '.join(sorted(found))}"
                )
            if found[column] not in kinds:
                raise DataError(
                    f"{where}: {schema}.{src.table}.{column} should be "
                    f"{' or '.join(sorted(kinds))}, found {found[column]}; "
                    "kept blocks count days by calendar date and sum integer columns (cast "
                    "others in the features SQL, from the facts)"
                )
        out[src.table] = Columns(evidence_columns(uc, src, list(found)), found)
    return out


def evidence_columns(uc: UseCase, src: Source, columns: list[str]) -> list[str]:
    """The columns whose content a kept state vouches for: those the source contract
    declares for its table (the same evidence as ``check_sources`` keeps), else all of the
    table's ``columns``."""
    from pipeline.conf.contract import load_contract

    declared = load_contract(uc.contract).tables.get(src.table)
    if declared is not None and declared.columns:
        return list(declared.columns)
    return columns


def _given(
    block: Block, seen: Seen | None, since: date, before: date
) -> dict[str, Evidence] | None:
    """The evidence of ``block``'s tables from ``seen``, if it covers the days the block
    needs (each table's days before ``since``, or every day, up to ``before``); else None."""
    from pipeline.conf.contract import ALL_HISTORY

    if seen is None:
        return None
    out = {}
    for src in block.sources:
        if src.table not in seen:
            return None
        start, days = seen[src.table]
        if src.days is None:
            needed = before - timedelta(days=ALL_HISTORY)
        else:
            needed = since - timedelta(days=src.days)
        if start > needed:
            return None
        out[src.table] = {d: [int(e[0]), str(e[1])] for d, e in days.items() if d < before}
    return out


def _evidence(
    settings: Settings, block: Block, columns: dict[str, Columns], since: date, before: date
) -> dict[str, Evidence]:
    """Per table of ``block``, per day it reads as of ``since`` or after, before ``before``:
    rows and a fingerprint of its evidence ``columns``, on a connection of its own."""
    conn = db.connect(settings.warehouse_url)
    try:
        out = {}
        for src in block.sources:
            bound: sql.Composable = sql.SQL("")
            params: tuple[Any, ...] = (before,)
            if src.days is not None:
                bound = sql.SQL(" AND {d} >= %s").format(d=sql.Identifier(src.date))
                params = (before, since - timedelta(days=src.days))
            query = sql.SQL(
                "SELECT {d}, count(*), {f} FROM {t} WHERE {d} < %s{b} GROUP BY 1"
            ).format(
                d=sql.Identifier(src.date),
                f=db.fingerprint(
                    columns[src.table].names, columns[src.table].types, db.hashes_records(conn)
                ),
                t=sql.Identifier(settings.warehouse_schema, src.table),
                b=bound,
            )
            with conn.cursor() as c:
                c.execute(query, params)
                out[src.table] = {db.to_date(d): [int(n), str(f)] for d, n, f in c.fetchall()}
        return out
    finally:
        conn.close()


def _folder(settings: Settings, uc: UseCase, block: Block) -> Path:
    sha = hashlib.sha256(block.definition.encode()).hexdigest()
    return settings.snapshots / uc.name / "windows" / block.name / sha[:12]


@dataclass(frozen=True)
class Kept:
    """A state kept by an earlier night: its date, file, and per table and day it was built
    from the rows and their content fingerprint."""

    as_of: date
    path: Path
    days: dict[str, Evidence]
    sources: tuple[Source, ...]

    def disagreements(self, evidence: dict[str, Evidence], shown: int = 5) -> list[str]:
        """The days whose rows or content differ in the warehouse now (``evidence``), said
        in words (at most ``shown``, then how many more); empty when every day agrees."""
        none = [0, "0"]
        kinds = {
            db.same_kind(str(a[1]), str(b[1]))
            for t in self.days
            for d, a in self.days[t].items()
            for b in [evidence.get(t, {}).get(d)]
            if b is not None
        }
        if False in kinds:
            return ["its days were fingerprinted another way (an earlier version): rebuilt once"]
        changed: list[tuple[str, date]] = []
        for src in self.sources:
            was, now = self.days.get(src.table, {}), evidence.get(src.table, {})
            if src.days is None:
                days = sorted(d for d in set(was) | set(now) if d < self.as_of)
            else:
                start = self.as_of - timedelta(days=src.days)
                days = [start + timedelta(days=i) for i in range(src.days)]
            changed += [(src.table, d) for d in days if was.get(d, none) != now.get(d, none)]
        named = len(self.sources) > 1
        out = []
        for table, d in changed[:shown]:
            was_n = self.days.get(table, {}).get(d, none)[0]
            now_n = evidence.get(table, {}).get(d, none)[0]
            what = f"{table} {d}" if named else f"{d}"
            out.append(
                f"{what}: {was_n:,} -> {now_n:,} rows"
                if was_n != now_n
                else f"{what}: {now_n:,} rows, content changed"
            )
        if len(changed) > shown:
            out.append(f"and {len(changed) - shown} more days")
        return out


def _newest(folder: Path, block: Block, as_of: date) -> Kept | None:
    """The newest kept state as of ``as_of`` or up to ``ROLL_LIMIT`` days before whose
    bytes match their hash."""
    for back in range(ROLL_LIMIT + 1):
        day = as_of - timedelta(days=back)
        for path in sorted((folder / f"as_of={day}").glob("*.parquet")):
            if files.sha256(path)[:16] != path.stem:
                log.warning("kept state %s does not match its content hash; not used", path)
                continue
            meta = pq.read_schema(path).metadata or {}
            # a state kept without its evidence (an earlier format) never agrees, once
            kept = json.loads(meta.get(b"nightscore_evidence", b"{}"))
            days = {
                table: {date.fromisoformat(d): list(e) for d, e in per_day.items()}
                for table, per_day in kept.items()
            }
            return Kept(day, path, days, block.sources)
    return None


def _keep(
    table: pa.Table, block: Block, folder: Path, as_of: date, evidence: dict[str, Evidence]
) -> None:
    """Write the block as of ``as_of`` (its rows, in key order) to the state store, with the
    evidence of the days it was built from."""
    days = {}
    for src in block.sources:
        start = date.min if src.days is None else as_of - timedelta(days=src.days)
        days[src.table] = {
            str(d): e for d, e in sorted(evidence.get(src.table, {}).items()) if start <= d < as_of
        }
    table = table.replace_schema_metadata(
        {"nightscore_as_of": str(as_of), "nightscore_evidence": json.dumps(days)}
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
