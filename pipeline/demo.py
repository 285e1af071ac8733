"""``make demo``: seed a small warehouse, run the DAGs across its drift event, summarize.

The synthetic warehouse drifts on day 300 (2024-10-27): the network launches in Poland
and a rival's unlimited-data offer starts luring heavy data users away. The demo trains a
champion 40 days before that, keeps it frozen (``retrain: never``) for three nights on
either side, lets ``churn_monitoring`` measure how those nights actually performed once
their labels matured, then lets the scheduled retrain replace the champion and measures
the new one too. Before each step the warehouse receives the facts up to it
(``advance``); every step is ``airflow dags test <dag> <date>`` against the embedded (or
configured) PostgreSQL. The summary is read back from the ledger and ``monitoring.*``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pipeline import airflow_env, db, ledger, usecase
from pipeline.config import Settings, load_settings, redact

DEMO_START = date(2024, 1, 1)
LAUNCH_DAY = 300  # the warehouse's drift event (see pipeline.warehouse)


@dataclass(frozen=True)
class Step:
    day: int  # days after DEMO_START; the run sees facts strictly before it
    dag: str
    why: str
    conf: dict[str, Any] = field(default_factory=dict)

    @property
    def date(self) -> date:
        return DEMO_START + timedelta(days=self.day)


SCHEDULE = (
    Step(260, "churn_nightly", "first night: trains the champion, 40 days before the launch"),
    Step(285, "churn_nightly", "champion frozen, before the launch", {"retrain": "never"}),
    Step(310, "churn_nightly", "champion frozen, 10 days after the launch", {"retrain": "never"}),
    Step(330, "churn_nightly", "champion frozen, 30 days after the launch", {"retrain": "never"}),
    Step(360, "churn_monitoring", "labels of the nights through day 330 have matured"),
    Step(360, "churn_nightly", "scheduled retrain on post-launch data; challenger vs champion"),
    Step(
        360,
        "churn_campaign",
        "retention emails to the newest night's audience (a local SMTP sink)",
        {"dry_run": False, "rate_per_second": 200},
    ),
    Step(390, "churn_monitoring", "the retrained champion's first night and the campaign matured"),
)


def _airflow(
    settings: Settings, args: list[str], log_path: Path, extra_env: dict[str, str] | None = None
) -> int:
    env = os.environ | airflow_env.airflow_env(settings) | (extra_env or {})
    airflow = Path(sys.executable).with_name("airflow")
    with log_path.open("w") as fh:
        return subprocess.call([str(airflow), *args], env=env, stdout=fh, stderr=subprocess.STDOUT)


def add_commands(sub: Any, parse_date: Any) -> None:
    """``nightscore warehouse seed | advance`` and ``nightscore demo`` (the simulated world)."""
    p = sub.add_parser("warehouse", help="the synthetic telco warehouse of the demo")
    wsub = p.add_subparsers(dest="action", required=True)
    s = wsub.add_parser("seed", help="create it from scratch")
    s.add_argument("--customers", type=int, default=20_000)
    s.add_argument("--start", type=parse_date, default=DEMO_START)
    s.add_argument("--days", type=int, default=456)
    s.add_argument("--seed", type=int, default=7)
    a = wsub.add_parser("advance", help="append simulated days through --to")
    a.add_argument("--to", type=parse_date, required=True)
    p.set_defaults(func=cmd_warehouse)

    p = sub.add_parser(
        "demo", help="seed a warehouse and run the DAGs across its drift event (about 7 min)"
    )
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=lambda args: run(customers=args.customers, seed=args.seed))


def cmd_warehouse(args: Any) -> int:
    from pipeline import warehouse

    settings = load_settings()
    if args.action == "seed":
        result = warehouse.seed(settings, args.customers, args.start, args.days, args.seed)
    else:
        result = warehouse.advance(settings, args.to)
    rows = ", ".join(f"{k} {v:,}" for k, v in result.rows.items())
    print(
        f"warehouse holds {result.start} .. {result.through} ({result.customers:,} customers); "
        f"wrote {rows} in {result.seconds:.1f}s"
    )
    return 0


def reset_serving(settings: Settings) -> None:
    """Drop and recreate the serving schemas so the demo starts from an empty registry."""
    from pipeline import serving

    conn = db.connect(settings.init_url)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS ml, predictions, monitoring, campaigns CASCADE")
        conn.commit()
    finally:
        conn.close()
    serving.init(settings.init_url, usecase.load_all())


def run(customers: int, seed: int) -> int:
    from pipeline import warehouse

    began = time.monotonic()
    settings = load_settings()
    logs = settings.home / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    first = SCHEDULE[0].date
    print(f"serving database: {redact(settings.database_url)}")
    print(
        f"seeding the warehouse: {customers:,} customers, {DEMO_START} .. {first - timedelta(days=1)}"
    )
    seeded = warehouse.seed(settings, customers, DEMO_START, SCHEDULE[0].day, seed)
    print(f"  {sum(seeded.rows.values()):,} rows in {seeded.seconds:.1f}s")
    launch = DEMO_START + timedelta(days=LAUNCH_DAY)
    print(f"drift event on {launch}: launch in Poland, a rival's unlimited-data offer")
    reset_serving(settings)
    print("preparing Airflow's metadata database ...")
    if _airflow(settings, ["db", "migrate"], logs / "airflow-db-migrate.log") != 0:
        print(f"airflow db migrate failed; see {logs / 'airflow-db-migrate.log'}", file=sys.stderr)
        return 1
    mailbox = logs / "mailbox"
    with local_mailbox(mailbox) as smtp_env:
        code = _run_schedule(settings, logs, first, smtp_env)
    if code:
        return code
    print()
    print(ledger.summary_text(settings, usecase.load("churn"), first))
    print()
    print(drift_text(settings, "churn", first))
    print()
    print(campaign_text(settings, "churn", mailbox))
    last = max(s.date for s in SCHEDULE if s.dag == "churn_nightly")
    report = settings.home / "reports" / "churn" / "nights" / f"{last}.html"
    if report.exists():
        print(f"\nnightly report for {last}: {report}")
    print(f"\ndemo finished in {time.monotonic() - began:.0f}s")
    return 0


def _run_schedule(settings: Settings, logs: Path, first: date, smtp_env: dict[str, str]) -> int:
    from pipeline import warehouse

    through = first - timedelta(days=1)
    for i, step in enumerate(SCHEDULE, 1):
        if step.date - timedelta(days=1) > through:
            through = step.date - timedelta(days=1)
            warehouse.advance(settings, through)
        log_path = logs / f"{step.dag}-{step.date}.log"
        args = ["dags", "test", step.dag, step.date.isoformat()]
        if step.conf:
            args += ["--conf", json.dumps(step.conf)]
        t0 = time.monotonic()
        print(f"{i}/{len(SCHEDULE)} {step.date}: {step.why}", flush=True)
        print(f"  airflow {' '.join(args)}", flush=True)
        code = _airflow(settings, args, log_path, smtp_env)
        status = _night_status(settings, step.date) if step.dag == "churn_nightly" else "done"
        print(
            f"  {status if code == 0 else 'failed'} in {time.monotonic() - t0:.0f}s (log: {log_path})"
        )
        if code != 0 or status not in ("published", "done"):
            print(
                f"{step.dag} {step.date} did not finish (exit {code}); see {log_path}",
                file=sys.stderr,
            )
            return 1
    return 0


@contextmanager
def local_mailbox(folder: Path) -> Iterator[dict[str, str]]:
    """A local SMTP server that files every message it receives under ``folder``.

    Yields the environment that points Airflow's ``nightscore_smtp`` connection at it.
    """
    from aiosmtpd.controller import Controller

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.eml"):
        old.unlink()

    class Mailbox:
        count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            Mailbox.count += 1
            (folder / f"{Mailbox.count:06d}.eml").write_bytes(envelope.content)
            return "250 Message accepted"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    controller = Controller(Mailbox(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield {
            "AIRFLOW_CONN_NIGHTSCORE_SMTP": json.dumps(
                {"conn_type": "smtp", "host": "127.0.0.1", "port": port}
            )
        }
    finally:
        controller.stop()


def _night_status(settings: Settings, night: date) -> str:
    rows = [r for r in ledger.runs(settings, "churn", night) if r["score_date"] == night]
    return rows[-1]["status"] if rows else "no ledger row"


def drift_text(settings: Settings, use_case: str, since: date) -> str:
    """Feature drift per night, realized performance by model version, and retrain requests."""
    url = settings.database_url
    drift = db.scalar(
        url,
        """
        SELECT coalesce(json_agg(n ORDER BY n.score_date), '[]') FROM (
            SELECT d.score_date, count(*) FILTER (WHERE NOT d.within_limit) AS beyond,
                   count(*) AS measured,
                   string_agg(d.feature || ' ' || to_char(d.psi, 'FM990.00'), ', '
                              ORDER BY d.psi DESC) FILTER (WHERE NOT d.within_limit) AS features
            FROM monitoring.drift d
            JOIN ml.runs r USING (use_case, score_date, run_id)
            WHERE d.use_case = %s AND d.score_date >= %s AND r.status = 'published'
            GROUP BY d.score_date
        ) n
        """,
        (use_case, since),
    )
    realized = db.scalar(
        url,
        """
        SELECT coalesce(json_agg(r ORDER BY r.score_date, r.model_version), '[]') FROM (
            SELECT score_date, model_version, rows, positives, roc_auc, holdout_auc, lift_top_decile
            FROM monitoring.realized_performance WHERE use_case = %s AND score_date >= %s
        ) r
        """,
        (use_case, since),
    )
    requests = db.scalar(
        url,
        "SELECT coalesce(json_agg(json_build_array(reason, consumed_by_run) ORDER BY request_id), "
        "'[]') FROM ml.retrain_requests WHERE use_case = %s",
        (use_case,),
    )
    lines = ["drift (PSI against the serving model's training reference; beyond the limit):"]
    for n in drift:
        features = n["features"] or "none"
        lines.append(f"  {n['score_date']}  {n['beyond']:>2}/{n['measured']:<2} {features}")
    lines += ["", "realized performance once labels matured (30 days):"]
    lines.append(
        f"  {'score_date':10}  {'model_version':25} {'rows':>7} {'churned':>7}  "
        f"{'AUC':>6}  {'holdout':>7}  {'lift@10%':>8}"
    )
    for r in realized:
        auc = f"{r['roc_auc']:.3f}" if r["roc_auc"] is not None else "-"
        holdout = f"{r['holdout_auc']:.3f}" if r["holdout_auc"] is not None else "-"
        lift = f"{r['lift_top_decile']:.2f}" if r["lift_top_decile"] is not None else "-"
        lines.append(
            f"  {r['score_date']:10}  {r['model_version']:25} {r['rows']:>7,} {r['positives']:>7,}  "
            f"{auc:>6}  {holdout:>7}  {lift:>8}"
        )
    if requests:
        lines += ["", "retrain requests:"]
        for reason, consumed in requests:
            state = f"honoured by {consumed}" if consumed else "open"
            lines.append(f"  {reason} ({state})")
    return "\n".join(lines)


def campaign_text(settings: Settings, use_case: str, mailbox: Path) -> str:
    """The newest campaign: audience, control band, sends, exports, and uplift once matured."""
    url = settings.database_url
    newest = db.scalar(
        url,
        "SELECT json_build_object('score_date', max(score_date), 'campaign', max(campaign), "
        "'audience', count(*)) FROM campaigns.retention_audience "
        "WHERE score_date = (SELECT max(score_date) FROM campaigns.retention_audience)",
    )
    if not newest or not newest["audience"]:
        return "retention campaign: no audience built"
    control = db.scalar(
        url,
        "SELECT count(*) FROM campaigns.retention_control_band WHERE campaign = %s",
        (newest["campaign"],),
    )
    sends = db.scalar(
        url,
        "SELECT coalesce(json_object_agg(status, n), '{}') FROM (SELECT status, count(*) AS n "
        "FROM campaigns.retention_send_log WHERE campaign = %s GROUP BY status) s",
        (newest["campaign"],),
    )
    example = db.scalar(
        url,
        "SELECT json_build_array(customer_id, round(churn_probability::numeric, 3), reasons) "
        "FROM campaigns.retention_audience WHERE campaign = %s ORDER BY audience_rank LIMIT 1",
        (newest["campaign"],),
    )
    uplift = db.scalar(
        url,
        "SELECT coalesce(json_agg(u ORDER BY score_date), '[]') FROM monitoring.campaign_uplift u "
        "WHERE use_case = %s",
        (use_case,),
    )
    exports = settings.home / "exports" / use_case / str(newest["score_date"])
    lines = [
        f"retention campaign {newest['campaign']}:",
        f"  audience {newest['audience']:,} (top risk band, opted in, not suppressed, outside "
        f"the control group); comparable control band {control:,}",
        f"  send log: {sends}; {len(list(mailbox.glob('*.eml'))):,} messages in {mailbox}",
        f"  most at risk: customer {example[0]}, p={example[1]}: {'; '.join(example[2])}",
        f"  exported for the email service: {exports}/retention_audience.{{csv,parquet}}",
    ]
    for u in uplift:
        if u["uplift"] is None:
            continue
        lines.append(
            f"  uplift once matured: churn {u['contacted_rate']:.1%} of {u['contacted']:,} contacted "
            f"vs {u['control_rate']:.1%} of {u['control']:,} in control: "
            f"{100 * u['uplift']:+.1f} pp (95% CI {100 * u['ci_low']:+.1f} .. {100 * u['ci_high']:+.1f})"
        )
    return "\n".join(lines)
