"""Database access: psycopg2 for DDL and transactions, ADBC for Arrow reads and COPY writes.

Reads from PostgreSQL go through the ADBC driver (Arrow-native, no per-row Python
objects); other warehouse engines go through SQLAlchemy. Writes are binary COPY via
``adbc_ingest``; nothing here uses ``DataFrame.to_sql`` or row-wise INSERT.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.conf.urls import normalize_url, redact, scrub, sqlalchemy_url
from pipeline.core.errors import ConfigError, SourceError
from pipeline.core.paths import SQL_DIR

_NAMED_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)\b")


def is_postgres(url: str) -> bool:
    return normalize_url(url).startswith("postgresql://")


def quote_ident(*names: str) -> str:
    """A (schema-)qualified identifier quoted for SQL text: ``"schema"."table"``.

    For queries sent through ADBC, which takes text; names come from validated config.
    """
    return ".".join('"' + n.replace('"', '""') + '"' for n in names)


def positional(query: str, params: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """Turn ``:name`` placeholders into PostgreSQL ``$n`` placeholders with their values.

    ``::type`` casts are left alone. Every placeholder must have a value.
    """
    order: list[str] = []

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in params:
            raise ConfigError(f"query parameter :{name} has no value; pass it in params")
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    text = _NAMED_PARAM.sub(repl, query)
    return text, tuple(params[n] for n in order)


def connect(url: str, *, autocommit: bool = False, application_name: str = "nightscore") -> Any:
    """A psycopg2 connection; failures name the (redacted) URL and what to check."""
    import psycopg2

    try:
        conn = psycopg2.connect(normalize_url(url), application_name=application_name)
    except psycopg2.OperationalError as exc:
        if 'role "nightscore_' in str(exc) and "does not exist" in str(exc):
            raise SourceError(
                f"the serving database at {redact(url)} has no nightscore roles yet: run "
                "`nightscore db init` once (it creates the schema and the writer/reader roles)"
            ) from exc
        raise SourceError(
            f"cannot connect to PostgreSQL at {redact(url)}: {scrub(str(exc).strip(), url)}; "
            "check that the server is running and the URL (NIGHTSCORE_DATABASE_URL / "
            "NIGHTSCORE_WAREHOUSE_URL or the Airflow connection) is right"
        ) from None
    conn.autocommit = autocommit
    return conn


def adbc_connect(url: str) -> Any:
    """An ADBC PostgreSQL connection (DB-API flavour)."""
    import adbc_driver_manager
    import adbc_driver_postgresql.dbapi

    try:
        return adbc_driver_postgresql.dbapi.connect(normalize_url(url))
    except adbc_driver_manager.Error as exc:
        raise SourceError(
            f"cannot connect to PostgreSQL at {redact(url)}: {scrub(str(exc), url)}; "
            "check that the server is running and the URL is right"
        ) from None


def set_search_path(cur: Any, schema: str | None) -> None:
    """Let SQL files name the warehouse's tables unqualified."""
    if schema:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", schema):
            raise ConfigError(f"schema name {schema!r} is not a plain identifier")
        cur.execute(f"SET search_path TO {quote_ident(schema)}, public")


def apply_settings(cur: Any, settings: Mapping[str, str], where: str) -> None:
    """``SET`` each of ``settings`` for the session of ``cur`` (an ADBC cursor).

    Raises:
        ConfigError: PostgreSQL refuses a name or a value (``where`` names the config key).
    """
    import adbc_driver_manager

    for name, value in settings.items():
        try:
            cur.execute("SELECT set_config($1, $2, false)", parameters=(name, value))
            cur.fetchall()
        except adbc_driver_manager.Error as exc:
            raise refused_setting(where, name, value, str(exc).strip().splitlines()[0]) from exc


def refused_setting(where: str, name: str, value: str, error: str) -> ConfigError:
    """The error of a PostgreSQL setting the server refused (``where``: its config key)."""
    return ConfigError(
        f"{where}.{name}: PostgreSQL refused {value!r} ({error}); give a setting this "
        "server knows, with a value it takes (SHOW ALL lists them)"
    )


@contextmanager
def arrow_reader(
    url: str,
    query: str,
    params: Mapping[str, Any] | None = None,
    schema: str | None = None,
    prepare: Callable[[Any], Any] | None = None,
) -> Iterator[pa.RecordBatchReader]:
    """Stream the result of ``query`` as Arrow record batches (bounded memory).

    ``schema`` sets the search path so that SQL files can name tables unqualified.
    ``prepare`` (PostgreSQL only) is called with the ADBC cursor before the query, in the
    same session (e.g. to create temporary tables the query reads).
    """

    def one(curs: list[Any]) -> list[tuple[str, Mapping[str, Any]]]:
        if prepare is not None and curs:
            prepare(curs[0])
        return [(query, params or {})]

    with arrow_readers(url, 1, schema, one) as reader:
        yield reader


@contextmanager
def arrow_readers(
    url: str,
    sessions: int,
    schema: str | None,
    prepare: Callable[[list[Any]], Sequence[tuple[str, Mapping[str, Any]]]],
) -> Iterator[pa.RecordBatchReader]:
    """Queries run at once, each in a PostgreSQL session of its own, their results read one
    after the other as one stream of record batches.

    ``prepare`` is called with the ``sessions`` ADBC cursors (search path set to ``schema``)
    and returns the query of each, ``(text, params)``, at most one per session, in the order
    their rows are read. Another database has no sessions: ``prepare`` gets none and
    returns one query, read through SQLAlchemy.
    """
    if not is_postgres(url):
        ((query, params),) = prepare([])
        table = _read_sqlalchemy(url, query, params, schema)
        yield pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
        return
    import adbc_driver_manager

    conns: list[Any] = []
    try:
        for _ in range(sessions):
            conns.append(adbc_connect(url))
        curs = [c.cursor() for c in conns]
        try:
            for cur in curs:
                set_search_path(cur, schema)
            queries = [positional(text, params) for text, params in prepare(curs)]
            with ThreadPoolExecutor(len(queries)) as pool:
                running = [
                    pool.submit(cur.execute, text, values or None)
                    for cur, (text, values) in zip(curs, queries, strict=False)
                ]
                for r in running:
                    r.result()
            readers = [cur.fetch_record_batch() for cur in curs[: len(queries)]]
        except adbc_driver_manager.Error as exc:
            raise source_error(exc, schema) from exc
        yield pa.RecordBatchReader.from_batches(
            readers[0].schema, (batch for reader in readers for batch in reader)
        )
        for cur in curs:
            cur.close()
    finally:
        for c in conns:
            c.close()


def read_arrow(
    url: str, query: str, params: Mapping[str, Any] | None = None, schema: str | None = None
) -> pa.Table:
    """The whole result of ``query`` as an Arrow table (use for small results)."""
    with arrow_reader(url, query, params, schema) as reader:
        return reader.read_all()


def source_error(exc: Exception, schema: str | None) -> SourceError:
    """A warehouse query's failure as an error naming the table or column and what to check."""
    message = str(exc)
    missing = re.search(r'relation "([^"]+)" does not exist', message)
    if missing:
        return missing_table(missing.group(1), schema, "the use case's SQL expects it")
    column = re.search(r'column "?([^" ]+)"? does not exist', message)
    if column:
        return SourceError(
            f"source column {column.group(1)!r} not found in schema {schema!r}: the use case's "
            "SQL expects it; compare its SQL files with the warehouse's tables"
        )
    first = message.strip().splitlines()[0] if message.strip() else repr(exc)
    return SourceError(f"warehouse query failed in schema {schema!r}: {first}")


def missing_table(table: str, schema: str | None, reader: str) -> SourceError:
    """A source table not found, with what reads it and where to look."""
    return SourceError(
        f"source table {table!r} not found in schema {schema!r}: {reader}; check "
        "warehouse.schema and the warehouse connection in its usecase.yaml (nightscore "
        "usecase show NAME prints where it reads)"
    )


def _read_sqlalchemy(
    url: str, query: str, params: Mapping[str, Any], schema: str | None
) -> pa.Table:
    import pandas as pd
    import sqlalchemy as sa

    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            frame = pd.read_sql(sa.text(query), conn, params=dict(params))
    finally:
        engine.dispose()
    return pa.Table.from_pandas(frame, preserve_index=False)


def ingest(url: str, table: str, data: pa.Table | pa.RecordBatchReader, schema: str) -> int:
    """Append ``data`` to an existing table with binary COPY; returns rows written."""
    conn = adbc_connect(url)
    try:
        cur = conn.cursor()
        rows = cur.adbc_ingest(table, data, mode="append", db_schema_name=schema)
        conn.commit()
        cur.close()
    finally:
        conn.close()
    return int(rows) if rows is not None and rows >= 0 else -1


def execute_file(url: str, path: Path) -> None:
    """Run a SQL file (one or more statements) in one transaction."""
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(path.read_text())
        conn.commit()
    finally:
        conn.close()


def apply_schema(url: str) -> list[str]:
    """Apply ``sql/schema/*.sql`` in name order. Every file is idempotent."""
    applied = []
    for path in sorted((SQL_DIR / "schema").glob("*.sql")):
        execute_file(url, path)
        applied.append(path.name)
    return applied


def scalar(url: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    return None if row is None else row[0]


def records(url: str, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The rows of ``query`` as dicts by column name (a few rows: pages, reports)."""
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return dict_rows(cur)
    finally:
        conn.close()


def dict_rows(cur: Any) -> list[dict[str, Any]]:
    """The rest of the rows of ``cur``'s last query, as dicts by column name."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def to_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


# Column types (information_schema names) PostgreSQL hashes as they are; any other column
# of a fingerprint is hashed as its text.
HASHED_AS_IS = frozenset(
    {
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "real",
        "double precision",
        "text",
        "character varying",
        "character",
        "date",
        "timestamp without time zone",
        "timestamp with time zone",
        "boolean",
        "uuid",
        "bytea",
        "jsonb",
        "interval",
    }
)
RECORD_HASH = "r"  # starts a fingerprint of hash_record_extended (PostgreSQL 14 and later)


def fingerprint(columns: list[str], types: Mapping[str, str], record_hash: bool = True) -> Any:
    """A content fingerprint of a group of rows, order-independent: the sum of a 64-bit
    hash of each row's ``columns``, as text. Rows changed in place, moved between entities
    or replaced by others with the same count change it; rows merely reordered do not; a
    NULL differs from an empty string or a zero.

    With ``record_hash`` (PostgreSQL 14 and later) each row is hashed as a record of its
    values (``hash_record_extended``; a column whose type ``types`` does not list in
    ``HASHED_AS_IS`` as its text): half the cost of hashing the row's text. Such a
    fingerprint starts with ``RECORD_HASH``; without, the row's text is hashed. Two
    fingerprints compare only if made the same way (:func:`same_kind`)."""
    from psycopg2 import sql

    if not record_hash:
        row = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        return sql.SQL(
            "CAST(coalesce(sum(hashtextextended(CAST(ROW({}) AS text), 0)), 0) AS text)"
        ).format(row)
    values = sql.SQL(", ").join(
        sql.Identifier(c)
        if types.get(c) in HASHED_AS_IS
        else sql.SQL("CAST({} AS text)").format(sql.Identifier(c))
        for c in columns
    )
    return sql.SQL("{} || CAST(coalesce(sum(hash_record_extended(ROW({}), 0)), 0) AS text)").format(
        sql.Literal(RECORD_HASH), values
    )


def same_kind(a: str | None, b: str | None) -> bool:
    """Whether two fingerprints are known and were made the same way (comparable)."""
    return (
        a is not None and b is not None and a.startswith(RECORD_HASH) == b.startswith(RECORD_HASH)
    )


def hashes_records(conn: Any) -> bool:
    """Whether the server of ``conn`` (psycopg2) has ``hash_record_extended`` (14 and later)."""
    return int(conn.server_version) >= 140000


def statement(text: str) -> str:
    """A statement without trailing whitespace and semicolons (it becomes a subquery)."""
    return text.rstrip().rstrip(";").rstrip()
