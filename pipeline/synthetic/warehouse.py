"""The synthetic telco warehouse: a deterministic, vectorized simulation bulk-loaded by COPY.

Customers sign up, use the network every day, get invoiced monthly and pay (some late),
open support tickets, see their fees change and cancel (``pipeline.synthetic.simulation``).
Two drift events shift the cancellation hazard mid-history:

* ``price_rise_day``: every German customer's fee rises 18%; price-sensitive ones leave.
* ``launch_day``: the network launches in Poland (the new customers churn more) and a
  rival's unlimited-data offer starts luring heavy data users away for good.

``seed`` creates the warehouse's tables and simulates its days, ``advance`` appends more.
Every day's random draws come from ``default_rng([seed, day])``, and the whole simulator
state is saved with the data, so ``advance`` continues exactly where ``seed`` stopped:
seeding K1 days then advancing to K2 gives the same warehouse as seeding K2 days.
The loop runs over days (a few hundred), never over customers; a background thread COPYs
each month's facts while the next are simulated.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.conf.config import Settings
from pipeline.core import progress
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.paths import SQL_DIR
from pipeline.store import db
from pipeline.synthetic.facts import Buffers
from pipeline.synthetic.simulation import initial_population, simulate_day
from pipeline.synthetic.world import EPOCH, NEVER, PLAN_DATA_GB, PLAN_FEES, PLAN_NAMES, Sim, World

log = logging.getLogger(__name__)

FLUSH_DAYS = 30

TABLE_ORDER = (
    "customers",
    "subscriptions",
    "usage_daily",
    "invoices",
    "payments",
    "tickets",
    "cancellations",
)


@dataclass(frozen=True)
class SeedResult:
    customers: int
    start: date
    through: date
    rows: dict[str, int]
    seconds: float


class _Writer:
    """COPYs Arrow tables on a background thread while the simulation computes the next days."""

    def __init__(self, url: str, schema: str):
        self.url, self.schema = url, schema
        self.rows: dict[str, int] = dict.fromkeys(TABLE_ORDER, 0)
        self.q: queue.Queue[dict[str, pa.Table] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="warehouse-copy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = db.adbc_connect(self.url)
        try:
            cur = conn.cursor()
            while (batch := self.q.get()) is not None:
                if self.error is None:
                    for name in TABLE_ORDER:
                        if name in batch:
                            cur.adbc_ingest(
                                name, batch[name], mode="append", db_schema_name=self.schema
                            )
                            self.rows[name] += batch[name].num_rows
                    conn.commit()
        except BaseException as exc:  # handed to the main thread in close()
            self.error = exc
            while self.q.get() is not None:
                pass
        finally:
            conn.close()

    def put(self, batch: dict[str, pa.Table]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(batch)

    def close(self) -> dict[str, int]:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.rows


def _run(settings: Settings, sim: Sim, through_day: int, initial: bool) -> dict[str, int]:
    out = Buffers()
    writer = _Writer(settings.warehouse_url, settings.warehouse_schema)
    with progress.stage("simulate_days", total=through_day - sim.day + 1, unit="days") as days:
        try:
            if initial:
                initial_population(sim, out)
            started = time.monotonic()
            while sim.day <= through_day:
                simulate_day(sim, out)
                days.advance()
                if sim.day % FLUSH_DAYS == 0 or sim.day > through_day:
                    writer.put(out.drain())
                    log.info(
                        "warehouse simulated through %s (%d customers so far, %.0fs)",
                        sim.world.start + timedelta(days=sim.day - 1),
                        sim.n,
                        time.monotonic() - started,
                    )
        finally:
            rows = writer.close()  # waits for the last COPY, inside the stage's time
    return rows


def _checked_schema(schema: str) -> str:
    """The warehouse schema name, refused unless it is a plain identifier."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", schema):
        raise ConfigError(
            f"warehouse schema: expected a plain identifier (letters, digits, _), found {schema!r}"
        )
    return schema


def _schema_conn(settings: Settings) -> Any:
    conn = db.connect(settings.warehouse_url)
    with conn.cursor() as cur:
        schema = db.quote_ident(_checked_schema(settings.warehouse_schema))
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        cur.execute(f"SET search_path TO {schema}")
    return conn


def _save_state(settings: Settings, sim: Sim) -> None:
    """Store the generator's state (for ``advance``), then index and analyze the tables."""
    with progress.stage("index_and_analyze"):
        conn = _schema_conn(settings)
        try:
            with conn.cursor() as cur:
                cur.execute("TRUNCATE generator_state")
                cur.execute(
                    "INSERT INTO generator_state (seed, start_date, through_date, state) VALUES (%s, %s, %s, %s)",
                    (
                        sim.world.seed,
                        sim.world.start,
                        sim.world.start + timedelta(days=sim.day - 1),
                        sim.dumps(),
                    ),
                )
                cur.execute((SQL_DIR / "warehouse" / "indexes.sql").read_text())
                _save_truth(cur, settings, sim)
            conn.commit()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ANALYZE")
        finally:
            conn.close()


def seed(settings: Settings, world: World, days: int) -> SeedResult:
    """Create the warehouse from scratch: ``world``'s customers and ``days`` days from its start.

    Facts are dated ``world.start`` .. ``world.start + days - 1``. Existing warehouse
    tables are dropped.

    Raises:
        ConfigError: fewer than 100 customers or no day.
    """
    if world.customers < 100 or days < 1:
        raise ConfigError(
            f"seed needs --customers >= 100 and --days >= 1 (found {world.customers}, {days})"
        )
    began = time.monotonic()
    _create_tables(settings)
    sim = Sim(world)
    rows = _run(settings, sim, days - 1, initial=True)
    _save_state(settings, sim)
    result = SeedResult(
        sim.n, world.start, world.start + timedelta(days=days - 1), rows, time.monotonic() - began
    )
    log.info("seeded warehouse: %s", result)
    return result


def _create_tables(settings: Settings) -> None:
    """The warehouse's empty tables and its plans (the tables and the truth dropped first)."""
    with progress.stage("create_tables"):
        conn = _schema_conn(settings)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"DROP SCHEMA IF EXISTS {db.quote_ident(truth_schema(settings))} CASCADE"
                )
                cur.execute((SQL_DIR / "warehouse" / "schema.sql").read_text())
                plans = [
                    (i + 1, str(PLAN_NAMES[i]), float(PLAN_FEES[i]), int(PLAN_DATA_GB[i]))
                    for i in range(len(PLAN_NAMES))
                ]
                cur.executemany("INSERT INTO plans VALUES (%s, %s, %s, %s)", plans)
            conn.commit()
        finally:
            conn.close()


def advance(settings: Settings, to: date) -> SeedResult:
    """Append simulated days so that the warehouse holds facts through ``to`` (inclusive)."""
    began = time.monotonic()
    conn = _schema_conn(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state FROM generator_state")
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        raise DataError(
            "the warehouse has no generator state: run `nightscore warehouse seed` first"
        )
    sim = Sim.loads(bytes(row[0]))
    through_day = (to - sim.world.start).days
    current = sim.world.start + timedelta(days=sim.day - 1)
    if through_day < sim.day:
        raise ConfigError(
            f"warehouse already holds facts through {current}; --to must be after it (found {to})"
        )
    sim.sends = sent_emails(settings, current + timedelta(days=1), to, sim.world.start)
    rows = _run(settings, sim, through_day, initial=False)
    _save_state(settings, sim)
    return SeedResult(sim.n, sim.world.start, to, rows, time.monotonic() - began)


def sent_emails(settings: Settings, first: date, last: date, start: date) -> dict[int, np.ndarray]:
    """Who was sent an email dated ``first`` .. ``last``: {simulated day: customer ids}.

    Every campaign's send log in the serving database counts (``campaigns.*_send_log``,
    rows marked sent); a send dated before ``first`` came after its day was simulated and
    changes nothing.
    """
    tables = db.read_arrow(
        settings.database_url,
        "SELECT table_name FROM information_schema.columns WHERE table_schema = 'campaigns' "
        "AND table_name LIKE '%\\_send\\_log' AND column_name = 'customer_id' ORDER BY 1",
    ).column("table_name")
    if not len(tables):
        return {}
    found = db.read_arrow(
        settings.database_url,
        " UNION ".join(
            f"SELECT customer_id, score_date FROM {db.quote_ident('campaigns', t)} "
            "WHERE status = 'sent' AND score_date BETWEEN :first AND :last"
            for t in tables.to_pylist()
        ),
        {"first": first, "last": last},
    )
    customers = found.column("customer_id").to_numpy().astype(np.int64)
    days = found.column("score_date").cast(pa.int32()).to_numpy() - (start - EPOCH).days
    return {int(d): np.unique(customers[days == d]) for d in np.unique(days)}


def truth_schema(settings: Settings) -> str:
    """The schema holding the simulator's truth about emails (no pipeline role reads it)."""
    return f"{_checked_schema(settings.warehouse_schema)}_truth"


def _save_truth(cur: Any, settings: Settings, sim: Sim) -> None:
    """Write each send's effect and counterfactual, and each send day's would-be effects.

    ``exposures``: one row per email sent (customer, day, log-odds effect, the day they
    would have cancelled without it, if within ``TRUTH_DAYS``). ``effects``: for each
    active customer on each day with sends, the effect an email that day would have had
    and the expected cancellations it would prevent in ``EMAIL_DAYS`` days at that day's
    hazard (``saved``), so that any targeting policy can be scored on the same night.
    """
    schema = db.quote_ident(truth_schema(settings))
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    cur.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.exposures (customer_id integer NOT NULL, "
        "contact_date date NOT NULL, effect real NOT NULL, counterfactual_cancel_date date, "
        "PRIMARY KEY (contact_date, customer_id))"
    )
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.effects (as_of date NOT NULL, "
        "customer_id integer NOT NULL, effect real NOT NULL, saved real NOT NULL, "
        "PRIMARY KEY (as_of, customer_id))"
    )
    x = sim.x
    cur.execute(f"TRUNCATE {schema}.exposures")
    _copy(
        cur,
        f"{schema}.exposures",
        pa.table(
            {
                "customer_id": pa.array(sim.a["customer_id"][x["cust"]]),
                "contact_date": _sim_dates(sim, x["day"]),
                "effect": pa.array(x["effect"]),
                "counterfactual_cancel_date": _sim_dates(sim, x["cf_day"], x["cf_day"] == NEVER),
            }
        ),
    )
    for part in sim.effects:
        cur.execute(
            f"DELETE FROM {schema}.effects WHERE as_of = %s",
            (sim.world.start + timedelta(days=int(part["day"][0])),),
        )
        _copy(
            cur,
            f"{schema}.effects",
            pa.table(
                {
                    "as_of": _sim_dates(sim, part["day"]),
                    "customer_id": pa.array(sim.a["customer_id"][part["cust"]]),
                    "effect": pa.array(part["effect"]),
                    "saved": pa.array(part["saved"]),
                }
            ),
        )
    sim.effects = []


def _sim_dates(sim: Sim, days: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """Simulated day numbers as dates (NULL where ``null``)."""
    epoch_days = (days.astype(np.int64) + (sim.world.start - EPOCH).days).astype(np.int32)
    return pa.array(epoch_days, mask=null).cast(pa.date32())


def _copy(cur: Any, table: str, rows: pa.Table) -> None:
    """COPY an Arrow table's rows (columns in the table's order) into ``table``."""
    import pyarrow.csv as pacsv

    if not rows.num_rows:
        return
    buf = io.BytesIO()
    pacsv.write_csv(rows, buf, pacsv.WriteOptions(include_header=False))
    buf.seek(0)
    cur.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", buf)


def data_through(settings: Settings) -> date | None:
    """The last day the synthetic warehouse holds facts for (None if not seeded)."""
    try:
        value = db.scalar(
            settings.warehouse_url,
            "SELECT through_date FROM "
            f"{db.quote_ident(_checked_schema(settings.warehouse_schema), 'generator_state')}",
        )
    except Exception:
        return None
    return db.to_date(value) if value is not None else None
