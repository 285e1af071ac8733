"""Sending a campaign's emails, each entity at most once, ever.

``campaigns.send_log`` has one row per (campaign, customer). A row is claimed ('sending')
and committed before the SMTP call and marked 'sent' after it, so a retry, re-run or
backfill skips everyone already claimed: nobody is emailed twice. A process killed between
the claim and the mark leaves 'sending': that message may or may not have left, so it is
reported as unconfirmed and never retried. A dry run renders the messages into an outbox
and records nothing. Email addresses never go to logs or return values (XComs): only
counts and entity keys.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from typing import Any

from psycopg2 import sql

from pipeline.campaigns.campaign import (
    campaign_name,
    campaign_table,
    configured,
    latest_published,
)
from pipeline.conf.config import Settings, private_dir, private_file
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ConfigError
from pipeline.core.faults import fault_point
from pipeline.store import db

log = logging.getLogger(__name__)


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
    """(subject, body) of the campaign's email (``campaign.template``) for one entity."""
    import jinja2

    template = configured(uc).template
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    text = env.get_template(template.name).render(first_name=first_name, reasons=reasons)
    head, _, body = text.partition("\n")
    if not head.startswith("Subject: "):
        raise ConfigError(
            f"email template {template} (campaign.template of {uc.source}) must start with a "
            "'Subject: ...' line"
        )
    return head.removeprefix("Subject: ").strip(), body


class MessageError(ValueError):
    """One entity's message cannot be built (a bad address, say): that entity fails alone."""


def _header(value: str) -> str:
    """A header value on one line: control characters (CR, LF, ...) become spaces."""
    return " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in value).split())


def _message(
    sender: str, to: str, subject: str, body: str, message_id: str, campaign: str
) -> EmailMessage:
    """The email, validated: one address in To, header values on one line.

    Raises:
        MessageError: the address is not a single valid address, or a header is refused.
    """
    address = (to or "").strip()
    _, parsed = parseaddr(address)
    if (
        not parsed
        or parsed != address
        or "@" not in parsed
        or any(unicodedata.category(c)[0] in "CZ" for c in parsed)
    ):
        raise MessageError(f"invalid email address ({len(address)} characters)")
    msg = EmailMessage()
    try:
        msg["From"] = _header(sender)
        msg["To"] = parsed
        msg["Subject"] = _header(subject)
        msg["Message-ID"] = message_id
        msg["X-Campaign"] = _header(campaign)
        msg.set_content(body)
        bytes(msg)  # everything must serialize before anything is claimed
    except (ValueError, TypeError) as exc:
        raise MessageError(f"message cannot be built: {type(exc).__name__}: {exc}") from None
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


@dataclass(frozen=True)
class Mailing:
    """One campaign's send: what every message of it shares."""

    uc: UseCase
    campaign: str
    score_date: date
    run_id: str
    target: SmtpTarget | None

    @property
    def sender(self) -> str:
        return self.target.sender if self.target else DEFAULT_SENDER

    @property
    def names(self) -> dict[str, sql.Composable]:
        """The send log, the opt-outs and the key, as SQL identifiers."""
        cfg = configured(self.uc)
        return {
            "log": campaign_table(cfg.send_log_table),
            "outs": campaign_table(cfg.opt_outs_table),
            "key": sql.Identifier(self.uc.entity_key),
        }


@dataclass(frozen=True)
class Recipient:
    """One audience member to email (the address never leaves this value)."""

    entity: Any
    first_name: str
    email: str
    reasons: list[str]


@dataclass(frozen=True)
class Ledger:
    """A campaign's audience against its send log and the opt-outs, before a send."""

    audience: list[Recipient]  # in audience rank
    claimed: dict[Any, str]  # status by key, of this campaign's send log
    unsubscribed: set[Any]

    @property
    def todo(self) -> list[Recipient]:
        """Whom this send emails: neither claimed nor unsubscribed."""
        return [
            r
            for r in self.audience
            if r.entity not in self.claimed and r.entity not in self.unsubscribed
        ]

    def counts(self, campaign: str, dry_run: bool) -> dict[str, Any]:
        """The counts a send starts from."""
        return {
            "campaign": campaign,
            "audience": len(self.audience),
            "already_sent": sum(1 for s in self.claimed.values() if s == "sent"),
            "unconfirmed": sorted(k for k, s in self.claimed.items() if s == "sending"),
            "unsubscribed": sum(
                1
                for r in self.audience
                if r.entity in self.unsubscribed and r.entity not in self.claimed
            ),
            "sent": 0,
            "failed": 0,
            "skipped": 0,
            "dry_run": dry_run,
        }


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

    Raises:
        ConfigError: a real send without an SMTP server (``target`` None).
    """
    mailing = Mailing(uc, campaign_name(uc, score_date), score_date, run_id, target)
    newest = latest_published(settings, uc)
    if not past_dates and newest != score_date:
        return _not_newest(mailing, newest)
    ledger = _ledger(settings, mailing)
    counts = ledger.counts(mailing.campaign, dry_run)
    rate = rate_per_second or configured(uc).send_rate_per_second
    began = time.monotonic()
    if dry_run:
        return _render_outbox(settings, mailing, ledger.todo, counts)
    if target is None:
        raise ConfigError(
            "no SMTP server for a real send: define the Airflow connection nightscore_smtp "
            '(host, port, login, password; extra {"starttls": true, "from": "..."}) '
            "or run with dry_run"
        )
    _send_all(settings, mailing, ledger.todo, counts, _Pace(began, rate))
    return _finished(mailing, counts, began)


def _not_newest(mailing: Mailing, newest: date | None) -> dict[str, Any]:
    log.info(
        "%s: %s is not the newest published date (%s); nobody is emailed from past "
        "predictions (pass past_dates to force)",
        mailing.campaign,
        mailing.score_date,
        newest,
    )
    return {
        "campaign": mailing.campaign,
        "sent": 0,
        "skipped_reason": f"newest published is {newest}",
    }


def _ledger(settings: Settings, mailing: Mailing) -> Ledger:
    """The campaign's audience, who of it is claimed in the send log, and the opt-outs."""
    cfg = configured(mailing.uc)
    key = sql.Identifier(mailing.uc.entity_key)
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "SELECT {key}, first_name, email, reasons FROM {t} WHERE score_date = %s "
                    "ORDER BY audience_rank"
                ).format(key=key, t=campaign_table(cfg.audience_table)),
                (mailing.score_date,),
            )
            audience = [Recipient(*row) for row in cur.fetchall()]
            cur.execute(
                sql.SQL("SELECT {key}, status FROM {t} WHERE campaign = %s").format(
                    key=key, t=campaign_table(cfg.send_log_table)
                ),
                (mailing.campaign,),
            )
            claimed = dict(cur.fetchall())
            cur.execute(
                sql.SQL("SELECT {key} FROM {t}").format(
                    key=key, t=campaign_table(cfg.opt_outs_table)
                )
            )
            unsubscribed = {r[0] for r in cur.fetchall()}
        conn.commit()
    finally:
        conn.close()
    return Ledger(audience, claimed, unsubscribed)


def _render_outbox(
    settings: Settings, mailing: Mailing, todo: list[Recipient], counts: dict[str, Any]
) -> dict[str, Any]:
    """A dry run: every message into the campaign's outbox folder, nothing recorded."""
    outbox = private_dir(settings.home / "outbox" / mailing.campaign)
    rendered = 0
    for recipient in todo:
        try:
            msg = _build(mailing, recipient)
        except MessageError as err:
            counts["failed"] += 1
            log.warning(
                "%s: %s %s: %s", mailing.campaign, mailing.uc.entity_key, recipient.entity, err
            )
            continue
        path = outbox / f"{_file_name(recipient.entity)}.eml"
        path.write_bytes(bytes(msg))
        private_file(path)
        rendered += 1
    counts["rendered"] = rendered
    counts["outbox"] = str(outbox)
    log.info("%s dry run: %d messages rendered into %s", mailing.campaign, len(todo), outbox)
    return counts


@dataclass(frozen=True)
class _Pace:
    """At most ``rate`` messages a second from ``began``."""

    began: float
    rate: float

    def wait(self, sent: int) -> None:
        """Sleep until the message after ``sent`` others may leave."""
        wait = self.began + sent / self.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def _send_all(
    settings: Settings,
    mailing: Mailing,
    todo: list[Recipient],
    counts: dict[str, Any],
    pace: _Pace,
) -> None:
    """Send to each of ``todo`` in turn over one SMTP connection, counting by outcome."""
    if not todo:
        return
    assert mailing.target is not None
    with _smtp(mailing.target) as server:
        conn = db.connect(settings.database_url)
        try:
            for i, recipient in enumerate(todo, 1):
                pace.wait(i - 1)
                status = _send_one(conn, server, mailing, recipient)
                counts[status] += 1
                fault_point("campaign_sent", i)
        finally:
            conn.close()


def _finished(mailing: Mailing, counts: dict[str, Any], began: float) -> dict[str, Any]:
    seconds = time.monotonic() - began
    counts["seconds"] = round(seconds, 2)
    log.info(
        "%s: %d sent, %d failed, %d already sent, %d unsubscribed, %d unconfirmed "
        "(claimed by a run that stopped mid-send; not retried) in %.1fs",
        mailing.campaign,
        counts["sent"],
        counts["failed"],
        counts["already_sent"],
        counts["unsubscribed"],
        len(counts["unconfirmed"]),
        seconds,
    )
    return counts


def _message_id(campaign: str, entity: Any) -> str:
    return make_msgid(idstring=f"{campaign}.{_file_name(entity)}", domain="nightscore.invalid")


def _file_name(entity: Any) -> str:
    """A key as a safe file name or message-id part (text keys may hold any character)."""
    text = str(entity)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def _build(mailing: Mailing, recipient: Recipient) -> EmailMessage:
    """Render and build one entity's message.

    Raises:
        MessageError: it cannot be built.
    """
    try:
        subject, body = render(mailing.uc, _header(recipient.first_name or ""), recipient.reasons)
    except Exception as exc:  # a template error for this entity's values only
        raise MessageError(f"template cannot be rendered: {type(exc).__name__}: {exc}") from None
    return _message(
        mailing.sender,
        recipient.email,
        subject,
        body,
        _message_id(mailing.campaign, recipient.entity),
        mailing.campaign,
    )


def _send_one(conn: Any, server: smtplib.SMTP, mailing: Mailing, recipient: Recipient) -> str:
    """Build, claim, send, mark. Returns 'sent', 'failed' or 'skipped' (someone else's).

    The message is built and validated before anything is claimed: one that cannot be
    built is recorded 'failed' with the reason, and the send goes on to the next entity.
    """
    campaign, entity = mailing.campaign, recipient.entity
    message_id = _message_id(campaign, entity)
    names = mailing.names
    try:
        msg = _build(mailing, recipient)
        problem = None
    except MessageError as err:
        problem = str(err)
    if not _claim(conn, mailing, entity, message_id, problem):
        return "skipped"
    if problem:
        log.warning("%s: %s %s not sent: %s", campaign, mailing.uc.entity_key, entity, problem)
        return "failed"
    fault_point("campaign_claimed")
    try:
        server.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        code = next(iter(exc.recipients.values()))[0] if exc.recipients else "?"
        _mark(conn, mailing, entity, "failed", f"recipient refused (SMTP {code})")
        return "failed"
    except (smtplib.SMTPException, OSError):
        # the server did not take the message: release the claim so a retry sends it
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DELETE FROM {log} WHERE campaign = %s AND {key} = %s").format(**names),
                (campaign, entity),
            )
        conn.commit()
        raise
    _mark(conn, mailing, entity, "sent", None)
    return "sent"


def _claim(conn: Any, mailing: Mailing, entity: Any, message_id: str, problem: str | None) -> bool:
    """Claim ``entity`` in the send log ('sending', or 'failed' with the ``problem`` of a
    message that cannot be built), committed; False when it is claimed or opted out."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {log} (campaign, {key}, score_date, run_id, message_id, status, "
                "error, sent_at) SELECT %s, %s, %s, %s, %s, %s, %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM {outs} WHERE {key} = %s) "
                "ON CONFLICT (campaign, {key}) DO NOTHING RETURNING 1"
            ).format(**mailing.names),
            (
                mailing.campaign,
                entity,
                mailing.score_date,
                mailing.run_id,
                message_id,
                "failed" if problem else "sending",
                problem,
                datetime.now(UTC) if problem else None,
                entity,
            ),
        )
        won = cur.fetchone() is not None
    conn.commit()
    return won


def _mark(conn: Any, mailing: Mailing, entity: Any, status: str, error: str | None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {log} SET status = %s, sent_at = now(), error = %s "
                "WHERE campaign = %s AND {key} = %s"
            ).format(**mailing.names),
            (status, error, mailing.campaign, entity),
        )
    conn.commit()
