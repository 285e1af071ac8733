"""Retention campaign feed: control group, audience with reasons, exports, idempotent sends.

* **Control group.** A salted hash of the customer id puts ``control_fraction`` of all
  customers in a permanent control group: the same customers whatever the run, model
  version or backfill. The flag is published with the predictions; they are never emailed.
* **Audience.** After a publish, the top risk band (``risk_decile <= audience_deciles``),
  opted in, not unsubscribed, outside the control group and not contacted by another
  campaign in the last ``suppression_days``, up to ``campaign_capacity``, most at risk
  first. Each customer carries up to three reasons from the model itself (see
  :func:`contributions`) in plain words. The control members who would have qualified
  go to ``campaigns.control_band`` (the comparison for uplift). Exported as CSV and
  Parquet for the email service.
* **Sends.** ``campaigns.send_log`` has one row per (campaign, customer), ever. A row is
  claimed ('sending') and committed before the SMTP call and marked 'sent' after it, so a
  retry, re-run or backfill skips everyone already claimed: nobody is emailed twice. A
  process killed between the claim and the mark leaves 'sending': that message may or
  may not have left, so it is reported as unconfirmed and never retried.

Email addresses never go to logs or return values (XComs): only counts and customer ids.
"""

from __future__ import annotations

import hashlib
import logging
import os
import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import db
from pipeline.config import Settings, UseCase
from pipeline.errors import ConfigError, DataError
from pipeline.faults import fault_point

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
_M1, _M2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)


def control_group(keys: np.ndarray, salt: str, fraction: float) -> np.ndarray:
    """True for the keys in the permanent control group (about ``fraction`` of all keys).

    A salted splitmix64 of each key, read as a number in [0, 1): depends on nothing but
    the key and the salt, so membership never changes across runs, models or backfills.
    """
    salt64 = np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little"))
    z = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ salt64
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return np.asarray((z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction)


def campaign_name(uc: UseCase, score_date: date) -> str:
    return f"{uc.name}_retention_{score_date:%Y%m%d}"


# -- reasons -------------------------------------------------------------------------------


def _plural(n: float, one: str, many: str) -> str:
    return f"{n:.0f} {one if round(n) == 1 else many}"


# Plain words for a feature pushing the score up, given the customer's value.
REASON_TEXT: dict[str, Any] = {
    "tenure_days": lambda v: f"you joined us only {_plural(v, 'day', 'days')} ago",
    "usage_trend": lambda v: (
        f"your calls fell {max(0.0, 1 - v):.0%} on the month before"
        if v < 1
        else "your usage pattern changed on the month before"
    ),
    "minutes_7d": lambda v: f"you called {v:.0f} minutes a day this week",
    "minutes_30d": lambda v: f"you called {v:.0f} minutes a day this month",
    "minutes_prev_30d": lambda v: f"you called {v:.0f} minutes a day the month before",
    "data_mb_30d": lambda v: f"you used {v:.0f} MB of data a day this month",
    "active_days_30d": lambda v: (
        f"you used your line on {_plural(v, 'day', 'days')} of the last 30"
    ),
    "days_since_last_usage": lambda v: f"no use of your line for {_plural(v, 'day', 'days')}",
    "late_payments_180d": lambda v: f"{_plural(v, 'late payment', 'late payments')} in 6 months",
    "overdue_invoices": lambda v: f"{_plural(v, 'overdue invoice', 'overdue invoices')}",
    "tickets_30d": lambda v: f"{_plural(v, 'support request', 'support requests')} this month",
    "tickets_90d": lambda v: f"{_plural(v, 'support request', 'support requests')} in 3 months",
    "complaints_90d": lambda v: (
        f"{_plural(v, 'billing complaint', 'billing complaints')} in 3 months"
    ),
    "monthly_fee": lambda v: f"you pay {v:.2f} a month",
    "fee_change_90d": lambda v: (
        f"your monthly fee rose {v:.0%} in 3 months"
        if v > 0
        else "your monthly fee changed in 3 months"
    ),
    "price_rises_180d": lambda v: f"{_plural(v, 'price rise', 'price rises')} in 6 months",
    "plan_id": lambda v: f"your current plan ({v:.0f})",
    "contract_type": lambda v: f"your {v} contract",
    "country": lambda v: f"your market ({v})",
    "channel": lambda v: f"you joined through {v}",
}
NOT_A_REASON = {"marketing_opt_in"}  # everyone in the audience opted in


def reason_text(feature: str, value: Any) -> str:
    words = REASON_TEXT.get(feature)
    if words is None or value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{feature.replace('_', ' ')}: {value}"
    return str(words(value))


def contributions(
    model: Any, rows: pa.Table, columns: list[str], baseline: dict[str, Any]
) -> np.ndarray:
    """Per row and feature: how much the feature raises this customer's score.

    The model's probability for the row minus its probability with that one feature set
    to the population's typical value (median, or the most common category). Positive
    means the customer's own value pushes the risk up. One batch predict per feature.
    """
    from pipeline import train

    p = train.predict(model, rows, columns)
    out = np.zeros((rows.num_rows, len(columns)))
    for j, name in enumerate(columns):
        col = rows.column(name)
        typical = pa.array([baseline[name]] * rows.num_rows, type=col.type)
        swapped = rows.set_column(rows.schema.get_field_index(name), name, typical)
        out[:, j] = p - train.predict(model, swapped, columns)
    return out


def typical_values(table: pa.Table, columns: list[str]) -> dict[str, Any]:
    """The median of each numeric feature, the most common value of each categorical one."""
    typical: dict[str, Any] = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_string(col.type):
            counts = col.value_counts()
            typical[name] = counts.field("values")[
                int(np.argmax(counts.field("counts").to_numpy()))
            ].as_py()
        else:
            value = pc.approximate_median(col).as_py()
            typical[name] = round(value) if pa.types.is_integer(col.type) else value
    return typical


def top_reasons(
    contrib: np.ndarray, rows: pa.Table, columns: list[str], most: int = 3
) -> list[tuple[list[str], list[str]]]:
    """Up to ``most`` (feature, words) per row: the features raising its score the most."""
    usable = np.array([c not in NOT_A_REASON for c in columns])
    ranked = np.argsort(-np.where(usable, contrib, -np.inf), axis=1)[:, :most]
    values = {c: rows.column(c).to_pylist() for c in columns}
    out = []
    for i, order in enumerate(ranked):
        chosen = [j for j in order if contrib[i, j] > 0 and usable[j]] or [int(order[0])]
        names = [columns[j] for j in chosen]
        out.append((names, [reason_text(c, values[c][i]) for c in names]))
    return out


# -- audience ------------------------------------------------------------------------------


def published_run(settings: Settings, uc: UseCase, score_date: date) -> dict[str, Any]:
    """The published run of ``score_date`` (model version, snapshot), or a DataError."""
    run = db.scalar(
        settings.database_url,
        "SELECT json_build_object('run_id', run_id, 'model_version', model_version, "
        "'snapshot_sha256', snapshot_sha256) FROM ml.runs WHERE use_case = %s AND score_date = %s "
        "AND status = 'published' ORDER BY finished_at DESC NULLS LAST LIMIT 1",
        (uc.name, score_date),
    )
    if not run:
        raise DataError(
            f"no published {uc.name} scores for {score_date} in ml.runs: run churn_nightly for "
            "that date first (the audience is built from published predictions only)"
        )
    return dict(run)


def latest_published(settings: Settings, uc: UseCase) -> date | None:
    value = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.runs WHERE use_case = %s AND status = 'published'",
        (uc.name,),
    )
    return db.to_date(value) if value else None


def _id_list(keys: np.ndarray) -> str:
    return "{" + ",".join(str(int(k)) for k in keys) + "}"


def _set_of(url: str, query: str, params: tuple[Any, ...]) -> set[int]:
    return set(
        db.scalar(url, f"SELECT coalesce(array_agg(customer_id), '{{}}') FROM ({query}) q", params)
    )


def build_audience(settings: Settings, uc: UseCase, score_date: date) -> dict[str, Any]:
    """Write the audience (and control band) of ``score_date`` and export it; returns counts."""
    from pipeline import features, registry

    began = time.monotonic()
    run = published_run(settings, uc, score_date)
    campaign = campaign_name(uc, score_date)
    band = db.read_arrow(
        settings.database_url,
        f"SELECT {uc.entity_key}, model_version, {uc.probability_column}, risk_decile, control_group "
        f"FROM predictions.{uc.score_table} WHERE score_date = :d AND risk_decile <= :band "
        f"ORDER BY {uc.probability_column} DESC, {uc.entity_key}",
        {"d": score_date, "band": uc.audience_deciles},
    )
    keys = band.column(uc.entity_key).to_numpy()
    ids = _id_list(keys)
    people = db.read_arrow(
        settings.warehouse_url,
        "SELECT CAST(customer_id AS bigint) AS customer_id, first_name, email, marketing_opt_in "
        "FROM customers WHERE customer_id = ANY(CAST(:ids AS bigint[]))",
        {"ids": ids},
        schema=settings.warehouse_schema,
    )
    contact = {
        k: (name, email, opt_in)
        for k, name, email, opt_in in zip(
            people.column("customer_id").to_pylist(),
            people.column("first_name").to_pylist(),
            people.column("email").to_pylist(),
            people.column("marketing_opt_in").to_pylist(),
            strict=True,
        )
    }
    unsubscribed = _set_of(
        settings.database_url,
        "SELECT customer_id FROM campaigns.opt_outs WHERE customer_id = ANY(CAST(%s AS bigint[]))",
        (ids,),
    )
    suppressed = _set_of(
        settings.database_url,
        "SELECT DISTINCT customer_id FROM campaigns.send_log WHERE campaign <> %s "
        "AND status IN ('sending', 'sent') AND score_date BETWEEN %s AND %s",
        (campaign, score_date - timedelta(days=uc.suppression_days), score_date),
    )
    in_control = band.column("control_group").to_numpy(zero_copy_only=False)
    opted_in = np.isin(keys, [k for k, (_, _, opt_in) in contact.items() if opt_in])
    not_unsubscribed = ~np.isin(keys, list(unsubscribed))
    not_suppressed = ~np.isin(keys, list(suppressed))
    eligible = opted_in & not_unsubscribed & not_suppressed
    chosen = np.flatnonzero(eligible & ~in_control)[: uc.campaign_capacity]
    probs = band.column(uc.probability_column).to_numpy()
    # the control members who would have made the same cut (same band, eligibility, score)
    cutoff = probs[chosen[-1]] if len(chosen) == uc.campaign_capacity else -np.inf
    control_rows = np.flatnonzero(eligible & in_control & (probs >= cutoff))

    audience = band.take(pa.array(chosen))
    reasons: list[tuple[list[str], list[str]]] = []
    if len(chosen):
        model, mv = registry.load_model(settings, uc.name, run["model_version"])
        columns = [f["name"] for f in mv.feature_schema]
        snapshot = features.find_snapshot(settings, uc, score_date, run["snapshot_sha256"])
        table = features.read_snapshot(snapshot, [uc.entity_key, *columns])
        rows = _rows_for(table, uc.entity_key, audience.column(uc.entity_key).to_numpy())
        contrib = contributions(model, rows, columns, typical_values(table, columns))
        reasons = top_reasons(contrib, rows, columns)
    _store_audience(
        settings,
        uc,
        score_date,
        campaign,
        audience,
        band.take(pa.array(control_rows)),
        contact,
        reasons,
    )
    exports = export_audience(settings, uc, score_date)
    out = {
        "score_date": score_date.isoformat(),
        "campaign": campaign,
        "model_version": run["model_version"],
        "band": len(keys),
        "audience": len(chosen),
        "control_band": len(control_rows),
        "excluded": {
            "control_group": int((eligible & in_control).sum()),
            "not_opted_in": int((~opted_in).sum()),
            "unsubscribed": int((opted_in & ~not_unsubscribed).sum()),
            "suppressed": int((opted_in & not_unsubscribed & ~not_suppressed).sum()),
            "over_capacity": int(max(0, (eligible & ~in_control).sum() - len(chosen))),
        },
        "exports": exports,
        "seconds": round(time.monotonic() - began, 2),
    }
    log.info(
        "%s: %d of %d in the top band selected, %d control members comparable; excluded %s",
        campaign,
        out["audience"],
        out["band"],
        out["control_band"],
        out["excluded"],
    )
    return out


def build_announced(settings: Settings, uc: UseCase, dates: list[str]) -> dict[str, Any]:
    """Build the audiences of the dates that publish events announced (oldest first).

    A date with no published run here (its publish was superseded, or the event came
    from another deployment) is skipped with a warning; nothing buildable is an error.
    """
    built, skipped = [], []
    for day in sorted(set(dates)):
        try:
            built.append(build_audience(settings, uc, db.to_date(day)))
        except DataError as err:
            if "no published" not in str(err):
                raise
            log.warning("skipping %s: %s", day, err)
            skipped.append(day)
    if not built:
        raise DataError(
            f"none of the announced dates {sorted(set(dates))} has published {uc.name} scores "
            "in ml.runs; trigger churn_campaign with score_date set to a published date"
        )
    return {"score_date": built[-1]["score_date"], "built": built, "skipped": skipped}


def _rows_for(table: pa.Table, key: str, wanted: np.ndarray) -> pa.Table:
    """The rows of ``table`` for ``wanted`` keys, in that order."""
    keys = table.column(key).to_numpy()
    order = np.argsort(keys, kind="stable")
    pos = order[np.searchsorted(keys, wanted, sorter=order)]
    if not np.array_equal(keys[pos], wanted):
        raise DataError(
            "the feature snapshot of the published run lacks some scored customers; "
            "re-run the night so that scores and snapshot agree"
        )
    return table.take(pa.array(pos))


def _store_audience(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    campaign: str,
    audience: pa.Table,
    control: pa.Table,
    contact: dict[int, tuple[str, str, bool]],
    reasons: list[tuple[list[str], list[str]]],
) -> None:
    """Replace the date's audience and control band in one transaction."""
    from psycopg2.extras import execute_values

    key, prob = uc.entity_key, uc.probability_column
    a_rows = [
        (
            score_date,
            campaign,
            k,
            rank,
            version,
            p,
            decile,
            contact[k][0],
            contact[k][1],
            words,
            names,
        )
        for rank, (k, version, p, decile, (names, words)) in enumerate(
            zip(
                audience.column(key).to_pylist(),
                audience.column("model_version").to_pylist(),
                audience.column(prob).to_pylist(),
                audience.column("risk_decile").to_pylist(),
                reasons,
                strict=True,
            ),
            1,
        )
    ]
    c_rows = [
        (score_date, campaign, k, version, p, decile)
        for k, version, p, decile in zip(
            control.column(key).to_pylist(),
            control.column("model_version").to_pylist(),
            control.column(prob).to_pylist(),
            control.column("risk_decile").to_pylist(),
            strict=True,
        )
    ]
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "DELETE FROM campaigns.retention_audience WHERE score_date = %s", (score_date,)
            )
            cur.execute("DELETE FROM campaigns.control_band WHERE score_date = %s", (score_date,))
            execute_values(
                cur,
                "INSERT INTO campaigns.retention_audience (score_date, campaign, customer_id, "
                "audience_rank, model_version, churn_probability, risk_decile, first_name, email, "
                "reasons, reason_features) VALUES %s",
                a_rows,
                page_size=1000,
            )
            execute_values(
                cur,
                "INSERT INTO campaigns.control_band (score_date, campaign, customer_id, "
                "model_version, churn_probability, risk_decile) VALUES %s",
                c_rows,
                page_size=1000,
            )
        conn.commit()
    finally:
        conn.close()


AUDIENCE_EXPORT_SQL = (
    "SELECT customer_id, audience_rank, first_name, email, churn_probability, risk_decile, "
    "reasons[1] AS reason_1, reasons[2] AS reason_2, reasons[3] AS reason_3, campaign, "
    "model_version FROM campaigns.retention_audience WHERE score_date = :d ORDER BY audience_rank"
)


def export_audience(settings: Settings, uc: UseCase, score_date: date) -> dict[str, str]:
    """Write the date's audience as CSV and Parquet for the email service (atomically)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = db.read_arrow(settings.database_url, AUDIENCE_EXPORT_SQL, {"d": score_date})
    out_dir = settings.home / "exports" / uc.name / score_date.isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("csv", "parquet"):
        final = out_dir / f"retention_audience.{kind}"
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        if kind == "csv":
            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
        os.replace(tmp, final)
        paths[kind] = str(final)
    return paths


# -- sending -------------------------------------------------------------------------------


DEFAULT_SENDER = "Customer Care <care@nightscore.invalid>"


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to send: from Airflow's SMTP connection (``nightscore_smtp``)."""

    host: str
    port: int = 25
    login: str | None = None
    password: str | None = None
    starttls: bool = False
    ssl: bool = False
    sender: str = DEFAULT_SENDER
    timeout: float = 30.0


def render(uc: UseCase, first_name: str, reasons: list[str]) -> tuple[str, str]:
    """(subject, body) of the retention email for one customer."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    text = env.get_template(f"{uc.name}_retention.txt").render(
        first_name=first_name, reasons=reasons
    )
    head, _, body = text.partition("\n")
    if not head.startswith("Subject: "):
        raise ConfigError(
            f"email template {TEMPLATES / f'{uc.name}_retention.txt'} must start with a "
            "'Subject: ...' line"
        )
    return head.removeprefix("Subject: ").strip(), body


def _message(
    sender: str, to: str, subject: str, body: str, message_id: str, campaign: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg["X-Campaign"] = campaign
    msg.set_content(body)
    return msg


@contextmanager
def _smtp(target: SmtpTarget) -> Iterator[smtplib.SMTP]:
    cls = smtplib.SMTP_SSL if target.ssl else smtplib.SMTP
    server = cls(target.host, target.port, timeout=target.timeout)
    try:
        if target.starttls and not target.ssl:
            server.starttls()
        if target.login:
            server.login(target.login, target.password or "")
        yield server
    finally:
        try:
            server.quit()
        except smtplib.SMTPException:
            server.close()


def send_campaign(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    run_id: str,
    *,
    target: SmtpTarget | None,
    dry_run: bool = True,
    rate_per_second: float | None = None,
    past_dates: bool = False,
) -> dict[str, Any]:
    """Email the date's audience at most once each; returns counts (never addresses).

    ``dry_run`` renders every message into ``$NIGHTSCORE_HOME/outbox/<campaign>/`` and
    records nothing, so a later real send still reaches everyone. Only the newest
    published date is emailed (a backfill rebuilds older audiences for the record) unless
    ``past_dates``.
    """
    campaign = campaign_name(uc, score_date)
    newest = latest_published(settings, uc)
    if not past_dates and newest != score_date:
        log.info(
            "%s: %s is not the newest published date (%s); nobody is emailed from past "
            "predictions (pass past_dates to force)",
            campaign,
            score_date,
            newest,
        )
        return {"campaign": campaign, "sent": 0, "skipped_reason": f"newest published is {newest}"}
    audience = db.scalar(
        settings.database_url,
        "SELECT coalesce(json_agg(json_build_array(customer_id, first_name, email, reasons) "
        "ORDER BY audience_rank), '[]') FROM campaigns.retention_audience WHERE score_date = %s",
        (score_date,),
    )
    claimed = dict(
        db.scalar(
            settings.database_url,
            "SELECT coalesce(json_agg(json_build_array(customer_id, status)), '[]') "
            "FROM campaigns.send_log WHERE campaign = %s",
            (campaign,),
        )
    )
    unsubscribed = _set_of(settings.database_url, "SELECT customer_id FROM campaigns.opt_outs", ())
    todo = [r for r in audience if r[0] not in claimed and r[0] not in unsubscribed]
    counts: dict[str, Any] = {
        "campaign": campaign,
        "audience": len(audience),
        "already_sent": sum(1 for s in claimed.values() if s == "sent"),
        "unconfirmed": sorted(k for k, s in claimed.items() if s == "sending"),
        "unsubscribed": sum(1 for r in audience if r[0] in unsubscribed and r[0] not in claimed),
        "sent": 0,
        "failed": 0,
        "skipped": 0,
        "dry_run": dry_run,
    }
    rate = rate_per_second or uc.send_rate_per_second
    began = time.monotonic()
    if dry_run:
        outbox = settings.home / "outbox" / campaign
        outbox.mkdir(parents=True, exist_ok=True)
        for customer_id, first_name, email, reasons in todo:
            subject, body = render(uc, first_name, reasons)
            msg = _message(
                target.sender if target else DEFAULT_SENDER,
                email,
                subject,
                body,
                _message_id(campaign, customer_id),
                campaign,
            )
            (outbox / f"{customer_id}.eml").write_bytes(bytes(msg))
        counts["rendered"] = len(todo)
        counts["outbox"] = str(outbox)
        log.info("%s dry run: %d messages rendered into %s", campaign, len(todo), outbox)
        return counts
    if target is None:
        raise ConfigError(
            "no SMTP server for a real send: define the Airflow connection nightscore_smtp "
            '(host, port, login, password; extra {"starttls": true, "from": "..."}) '
            "or run with dry_run"
        )
    if todo:
        with _smtp(target) as server:
            conn = db.connect(settings.database_url)
            try:
                for i, (customer_id, first_name, email, reasons) in enumerate(todo, 1):
                    _pace(began, i - 1, rate)
                    status = _send_one(
                        conn,
                        server,
                        target,
                        uc,
                        campaign,
                        score_date,
                        run_id,
                        customer_id,
                        first_name,
                        email,
                        reasons,
                    )
                    counts[status] += 1
                    fault_point("campaign_sent", i)
            finally:
                conn.close()
    seconds = time.monotonic() - began
    counts["seconds"] = round(seconds, 2)
    log.info(
        "%s: %d sent, %d failed, %d already sent, %d unsubscribed, %d unconfirmed "
        "(claimed by a run that stopped mid-send; not retried) in %.1fs",
        campaign,
        counts["sent"],
        counts["failed"],
        counts["already_sent"],
        counts["unsubscribed"],
        len(counts["unconfirmed"]),
        seconds,
    )
    return counts


def _pace(began: float, sent: int, rate: float) -> None:
    wait = began + sent / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def _message_id(campaign: str, customer_id: int) -> str:
    return make_msgid(idstring=f"{campaign}.{customer_id}", domain="nightscore.invalid")


def _send_one(
    conn: Any,
    server: smtplib.SMTP,
    target: SmtpTarget,
    uc: UseCase,
    campaign: str,
    score_date: date,
    run_id: str,
    customer_id: int,
    first_name: str,
    email: str,
    reasons: list[str],
) -> str:
    """Claim, send, mark. Returns 'sent', 'failed' (refused recipient) or '' (someone else)."""
    message_id = _message_id(campaign, customer_id)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO campaigns.send_log (campaign, customer_id, score_date, run_id, message_id, "
            "status) SELECT %s, %s, %s, %s, %s, 'sending' "
            "WHERE NOT EXISTS (SELECT 1 FROM campaigns.opt_outs WHERE customer_id = %s) "
            "ON CONFLICT (campaign, customer_id) DO NOTHING RETURNING 1",
            (campaign, customer_id, score_date, run_id, message_id, customer_id),
        )
        won = cur.fetchone() is not None
    conn.commit()
    if not won:
        return "skipped"
    fault_point("campaign_claimed")
    subject, body = render(uc, first_name, reasons)
    msg = _message(target.sender, email, subject, body, message_id, campaign)
    try:
        server.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        code = next(iter(exc.recipients.values()))[0] if exc.recipients else "?"
        _mark(conn, campaign, customer_id, "failed", f"recipient refused (SMTP {code})")
        return "failed"
    except (smtplib.SMTPException, OSError):
        # the server did not take the message: release the claim so a retry sends it
        with conn.cursor() as cur:
            cur.execute(
                "DELETE FROM campaigns.send_log WHERE campaign = %s AND customer_id = %s",
                (campaign, customer_id),
            )
        conn.commit()
        raise
    _mark(conn, campaign, customer_id, "sent", None)
    return "sent"


def _mark(conn: Any, campaign: str, customer_id: int, status: str, error: str | None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE campaigns.send_log SET status = %s, sent_at = now(), error = %s "
            "WHERE campaign = %s AND customer_id = %s",
            (status, error, campaign, customer_id),
        )
    conn.commit()


def campaign_date(settings: Settings, uc: UseCase, requested: str | None) -> date:
    """The score date a campaign run is for: the one asked for, else the newest published."""
    if requested:
        return db.to_date(requested)
    newest = latest_published(settings, uc)
    if newest is None:
        raise DataError(f"nothing published for {uc.name} yet: no campaign to run")
    return newest
