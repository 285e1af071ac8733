"""A warehouse nightscore never generated: a B2B software vendor's CRM, made by the tests.

Structurally unlike the telco warehouse: text account keys (``ACC-000042``), an activity
event table dated by ``timestamptz``, plan changes dated by a naive local ``timestamp``
(New York time), a region dimension without any date, other table and column names, in
its own database. Accounts whose activity fades and who lose seats are likelier to
cancel, so there is something to learn. Deterministic per seed; a loop over days,
vectorized over accounts; bulk-loaded with COPY.
"""

from __future__ import annotations

import io
from datetime import date, datetime, timedelta

import numpy as np

from pipeline.store import db

SCHEMA = "crm"
ZONE = "America/New_York"
REGIONS = [("NA-E", "North America East", False), ("NA-W", "North America West", False),
           ("EU-C", "Central Europe", True), ("EU-N", "Nordics", True), ("APAC", "Asia Pacific", False)]  # fmt: skip
TIERS = np.array(["starter", "team", "enterprise"])

DDL = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.regions (region_code text PRIMARY KEY, region_name text NOT NULL,
                               in_emea boolean NOT NULL);
CREATE TABLE {SCHEMA}.accounts (account_ref varchar(16) NOT NULL, opened_at timestamptz NOT NULL,
                                region_code text NOT NULL, tier text NOT NULL,
                                contact_name text NOT NULL, contact_email text NOT NULL,
                                newsletter boolean NOT NULL);
CREATE TABLE {SCHEMA}.plan_changes (account_ref varchar(16) NOT NULL, changed_at timestamp NOT NULL,
                                    seats integer NOT NULL, status text NOT NULL);
CREATE TABLE {SCHEMA}.activity (event_id bigint NOT NULL, account_ref varchar(16) NOT NULL,
                                happened_at timestamptz NOT NULL, kind text NOT NULL,
                                duration_s integer NOT NULL);
"""
INDEXES = f"""
CREATE INDEX ON {SCHEMA}.activity (happened_at);
CREATE INDEX ON {SCHEMA}.activity (account_ref, happened_at);
CREATE INDEX ON {SCHEMA}.plan_changes (account_ref, changed_at);
ANALYZE;
"""


def seed(url: str, start: date, days: int, accounts: int = 2500, seed: int = 5) -> dict[str, int]:
    """Create schema ``crm`` and simulate ``days`` days from ``start``; returns row counts."""
    rng = np.random.default_rng(seed)
    n = accounts
    refs = np.array([f"ACC-{i:06d}" for i in range(1, n + 1)], dtype=object)
    # a third of the accounts exist before the history starts, the rest open during it
    open_day = np.where(
        rng.random(n) < 0.35, -rng.integers(1, 400, n), rng.integers(0, days - 20, n)
    ).astype(np.int64)
    open_secs = rng.integers(8 * 3600, 20 * 3600, n)
    region = rng.integers(0, len(REGIONS), n)
    tier = rng.choice(3, n, p=[0.5, 0.35, 0.15])
    health = rng.normal(0, 1, n) + 0.4 * tier - 0.3 * (region >= 3)
    seats = np.maximum(1, (rng.gamma(2.0, 3.0, n) * (1 + 3 * tier)).astype(np.int64))
    fading_since = np.full(n, 10**6)  # the day an account starts to drift away
    cancelled = np.full(n, 10**6)
    changes: list[tuple[int, int, int, str]] = []  # (account, day, seats, status)
    for i in np.flatnonzero(open_day < 0):
        changes.append((i, int(open_day[i]), int(seats[i]), "active"))
    events_acc: list[np.ndarray] = []
    events_day: list[np.ndarray] = []
    for day in range(days):
        opening = np.flatnonzero(open_day == day)
        changes += [(int(i), day, int(seats[i]), "active") for i in opening]
        alive = (open_day <= day) & (cancelled > day)
        # some healthy-looking accounts begin to fade; fading accounts lose seats and cancel
        start_fading = (
            alive & (fading_since > day) & (rng.random(n) < 0.004 * np.exp(-0.8 * health))
        )
        fading_since[start_fading] = day
        faded = alive & (fading_since <= day)
        drop = faded & (rng.random(n) < 0.03) & (seats > 1)
        seats[drop] -= 1
        changes += [(int(i), day, int(seats[i]), "active") for i in np.flatnonzero(drop)]
        hazard = 0.0004 * np.exp(-0.5 * health) + np.where(
            faded, 0.012 * np.minimum(day - fading_since, 40) / 40, 0
        )
        leaving = alive & (rng.random(n) < hazard)
        cancelled[leaving] = day
        changes += [(int(i), day, int(seats[i]), "cancelled") for i in np.flatnonzero(leaving)]
        rate = 0.25 * np.sqrt(seats) * np.exp(0.3 * health) * np.where(faded, 0.35, 1.0)
        counts = rng.poisson(np.where(alive & ~leaving, rate, 0.0))
        events_acc.append(np.repeat(np.arange(n), counts))
        events_day.append(np.full(int(counts.sum()), day))
    acc = np.concatenate(events_acc)
    ev_day = np.concatenate(events_day)
    secs = rng.integers(0, 86400, len(acc))
    kinds = rng.choice(np.array(["login", "report", "export", "api_call"]), len(acc))
    duration = rng.integers(5, 3600, len(acc))

    def local(day: int, sec: int) -> str:
        moment = datetime.combine(start, datetime.min.time())
        return (moment + timedelta(days=int(day), seconds=int(sec))).isoformat(sep=" ")

    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(DDL)
            cur.execute(f"SET TIME ZONE '{ZONE}'")  # naive text below is New York local time
            _copy(cur, "regions", [(c, name, emea) for c, name, emea in REGIONS])
            _copy(
                cur,
                "accounts",
                [
                    (refs[i], local(int(open_day[i]), int(open_secs[i])), REGIONS[region[i]][0],
                     TIERS[tier[i]], f"Contact {i}", f"ops{i}@example.invalid", bool(i % 4 != 0))
                    for i in range(n)
                ],
            )  # fmt: skip
            _copy(
                cur,
                "plan_changes",
                [(refs[i], local(d, 43200 + (i % 3600)), s, status) for i, d, s, status in changes],
            )
            _copy(
                cur,
                "activity",
                zip(
                    range(1, len(acc) + 1),
                    refs[acc],
                    (local(int(d), int(s)) for d, s in zip(ev_day, secs, strict=True)),
                    kinds,
                    duration,
                    strict=True,
                ),
            )
            cur.execute(INDEXES)
        conn.commit()
    finally:
        conn.close()
    return {"accounts": n, "plan_changes": len(changes), "activity": len(acc)}


def _copy(cur, table: str, rows) -> None:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    for row in rows:
        buf.write("\t".join("t" if v is True else "f" if v is False else str(v) for v in row))
        buf.write("\n")
    buf.seek(0)
    cur.copy_expert(f"COPY {SCHEMA}.{table} FROM STDIN", buf)
