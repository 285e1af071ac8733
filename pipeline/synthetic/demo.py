"""``make demo``: seed a small warehouse, run the DAGs across its drift event, summarize.

The synthetic world covers the ``WORLD_DAYS`` days that end yesterday and drifts on day
300: the network launches in Poland
and a rival's unlimited-data offer starts luring heavy data users away. The demo trains a
champion 40 days before that, keeps it frozen (``retrain: never``) for three nights on
either side, lets ``churn_monitoring`` measure how those nights actually performed once
their labels matured, then lets the scheduled retrain replace the champion and measures
the new one too. Before each step the warehouse receives the facts up to it
(``advance``), and at the end the facts through yesterday, so that a night triggered now
finds its data; every step is ``airflow dags test <dag> <date>`` against the embedded (or
configured) PostgreSQL. The summary is read back from the ledger and ``monitoring.*``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.conf import usecase
from pipeline.conf.config import Settings, load_settings
from pipeline.conf.urls import redact
from pipeline.core import progress
from pipeline.faces import airflow_env
from pipeline.store import db, ledger

WORLD_DAYS = 456  # the simulated world ends yesterday: tonight's night finds its data
LAUNCH_DAY = 300  # the warehouse's drift event (see pipeline.synthetic.warehouse)
DEMO_CUSTOMERS = 40_000  # a weekly 1,000 from the riskiest tenth, suppression included
WEEK = "week"  # a step run in-process: the night (retrain never), then the campaign


def world_start(today: date | None = None) -> date:
    """The first day of the simulated world: ``WORLD_DAYS`` before today, so that its last
    day is yesterday and a night triggered now (or scheduled tonight) has its data."""
    return (today or date.today()) - timedelta(days=WORLD_DAYS)


@dataclass(frozen=True)
class Step:
    day: int  # days after the world's start; the run sees facts strictly before it
    dag: str
    why: str
    conf: dict[str, Any] = field(default_factory=dict)

    def on(self, start: date) -> date:
        return start + timedelta(days=self.day)


CAMPAIGN = {"dry_run": False, "rate_per_second": 200}
RISK_WEEKS = (367, 374, 381, 388, 395, 402, 409)  # with day 360: eight weekly cohorts
UPLIFT_NIGHTS = (439, 446, 453)  # ranked by the uplift policy promoted on day 439


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
        "the experiment's first weekly cohort: emails to the riskiest (a local SMTP sink)",
        CAMPAIGN,
    ),
    *(
        Step(day, WEEK, f"weekly cohort {i}, ranked by risk: night and campaign in-process")
        for i, day in enumerate(RISK_WEEKS, 2)
    ),
    Step(
        439,
        "churn_monitoring",
        "the eight cohorts have matured: pooled uplift; an uplift policy learns from six "
        "and is tested on the newest two",
    ),
    Step(439, "churn_nightly", "champion night", {"retrain": "never"}),
    Step(439, "churn_campaign", "the audience ranked by the policy in force", CAMPAIGN),
    *(
        Step(day, WEEK, "ranked by the policy in force: night and campaign in-process")
        for day in UPLIFT_NIGHTS[1:]
    ),
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
    s.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    s.add_argument(
        "--start", type=parse_date, help=f"first day (default: {WORLD_DAYS} days before today)"
    )
    s.add_argument("--days", type=int, default=WORLD_DAYS, help="days to simulate")
    s.add_argument("--seed", type=int, default=7)
    a = wsub.add_parser("advance", help="append simulated days through --to")
    a.add_argument("--to", type=parse_date, required=True)
    p.set_defaults(func=cmd_warehouse)

    p = sub.add_parser(
        "demo", help="seed a warehouse and run the DAGs across its drift event (about 7 min)"
    )
    p.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=lambda args: run(customers=args.customers, seed=args.seed))


def cmd_warehouse(args: Any) -> int:
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    settings = load_settings()
    if args.action == "seed":
        start = args.start or world_start()
        result = warehouse.seed(settings, World(args.customers, start, seed=args.seed), args.days)
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
    from pipeline.store import serving

    conn = db.connect(settings.init_url)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS ml, predictions, monitoring, campaigns CASCADE")
        conn.commit()
    finally:
        conn.close()
    serving.init(settings.init_url, usecase.load_all())


def run(customers: int, seed: int) -> int:
    """The demo: its steps are shown as stages on stderr; the summary goes to stdout."""
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    began = time.monotonic()
    settings = load_settings()
    logs = settings.home / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    start = world_start()
    first = SCHEDULE[0].on(start)
    progress.note(f"serving database: {redact(settings.database_url)}")
    with progress.stage("seed_warehouse"):
        progress.note(
            f"{customers:,} customers, {start} .. {first - timedelta(days=1)}; drift event on "
            f"{start + timedelta(days=LAUNCH_DAY)}: launch in Poland, a rival's "
            "unlimited-data offer"
        )
        seeded = warehouse.seed(settings, World(customers, start, seed=seed), SCHEDULE[0].day)
        progress.note(f"{sum(seeded.rows.values()):,} rows")
    with progress.stage("db_init"):
        reset_serving(settings)
    with progress.stage("airflow_db_migrate") as migrate:
        if _airflow(settings, ["db", "migrate"], logs / "airflow-db-migrate.log") != 0:
            _failed(migrate, f"airflow db migrate failed; see {logs / 'airflow-db-migrate.log'}")
            return 1
    mailbox = logs / "mailbox"
    with local_mailbox(mailbox) as smtp_env:
        code = _run_schedule(settings, logs, start, smtp_env)
    if code:
        return code
    yesterday = start + timedelta(days=WORLD_DAYS - 1)
    with progress.stage(f"advance_warehouse to {yesterday}"):
        progress.note("the world catches up with the clock: tonight's night finds its data")
        warehouse.advance(settings, yesterday)
    print(ledger.summary_text(settings, usecase.load("churn"), first))
    print()
    print(drift_text(settings, "churn", first))
    print()
    print(campaign_text(settings, "churn", mailbox))
    print()
    print(experiment_text(settings, start))
    last = max(s.on(start) for s in SCHEDULE if s.dag == "churn_nightly")
    report = settings.home / "reports" / "churn" / "nights" / f"{last}.html"
    if report.exists():
        print(f"\nnightly report for {last}: {report}")
    print(f"\ndemo finished in {time.monotonic() - began:.0f}s")
    if (settings.home / "pgdata" / "postmaster.pid").exists():
        print(
            "its embedded PostgreSQL keeps running for `make airflow` and later commands; "
            "`make stop` (nightscore stop) stops it"
        )
    return 0


def _run_schedule(settings: Settings, logs: Path, start: date, smtp_env: dict[str, str]) -> int:
    from pipeline.synthetic import warehouse

    through = SCHEDULE[0].on(start) - timedelta(days=1)
    for i, step in enumerate(SCHEDULE, 1):
        night = step.on(start)
        with progress.stage(f"{i}/{len(SCHEDULE)} {night} {step.dag}") as shown:
            progress.note(step.why)
            if night - timedelta(days=1) > through:
                through = night - timedelta(days=1)
                with progress.stage(f"advance_warehouse to {through}"):
                    warehouse.advance(settings, through)
            if step.dag == WEEK:
                _week(settings, night, smtp_env)
                continue
            log_path = logs / f"{step.dag}-{night}.log"
            args = ["dags", "test", step.dag, night.isoformat()]
            if step.conf:
                args += ["--conf", json.dumps(step.conf)]
            progress.note(f"airflow {' '.join(args)}  (log: {log_path})")
            began = datetime.now(UTC)
            if step.dag == "churn_nightly":
                with _night_stages(settings, "churn", night):
                    code = _airflow(settings, args, log_path, smtp_env)
                status = _night_status(settings, night)
            else:
                code, status = _airflow(settings, args, log_path, smtp_env), "done"
            like_a_real_run(settings, step.dag, night, began, f"demo step {i}: {step.why}")
            # each task's log where the UI reads it (dags test prints them only)
            airflow_env.file_task_logs(log_path, airflow_env.airflow_env(settings))
            if code != 0 or status not in ("published", "done"):
                _failed(
                    shown,
                    f"{step.dag} {night} did not finish (exit {code}, {status}); see {log_path}",
                )
                return 1
    return 0


def _week(settings: Settings, night: date, smtp_env: dict[str, str]) -> None:
    """One week of the experiment in-process: the night (champion only), then its campaign
    sent for real to the local mailbox; the same functions the DAGs' tasks call."""
    from pipeline.campaigns import audience, sending
    from pipeline.conf import config
    from pipeline.run import nightly

    uc = usecase.load("churn")
    s = config.load_settings(uc=uc)
    run_id = f"demo-week-{night}"
    with progress.stage("nightly (in-process)"):
        nightly.run_night(s, uc, night, retrain="never", run_id=run_id)
    with progress.stage("campaign (in-process)"):
        built = audience.build_audience(s, uc, night)
        smtp = json.loads(smtp_env["AIRFLOW_CONN_NIGHTSCORE_SMTP"])
        sent = sending.send_campaign(
            s,
            uc,
            night,
            run_id,
            target=sending.SmtpTarget(smtp["host"], int(smtp["port"])),
            dry_run=False,
            rate_per_second=1000,
        )
        progress.note(
            f"audience {built['audience']:,} ranked by {built['policy']}, control band "
            f"{built['control_band']:,}; sent {sent.get('sent', 0):,}"
        )


def like_a_real_run(
    settings: Settings, dag_id: str, night: date, began: datetime, note: str
) -> None:
    """Make a ``dags test`` run look like the scheduler's run of that night in the UI.

    ``dags test`` starts its run at the logical date (the UI would show a run of months)
    and stamps it to run after the wall clock (the grid would order the demo's nights by
    when the demo ran them). The run keeps its logical date (the score date); it gets the
    wall-clock start it really had, runs after its logical date, and a note saying why
    the demo ran it.
    """
    from datetime import time as clock

    logical = datetime.combine(night, clock(), tzinfo=UTC)
    url = airflow_env.metadata_url(settings).replace("postgresql+psycopg2://", "postgresql://", 1)
    conn = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE dag_run SET start_date = %s, run_after = logical_date "
                "WHERE dag_id = %s AND logical_date = %s RETURNING id",
                (began, dag_id, logical),
            )
            for (run_id,) in cur.fetchall():
                cur.execute(
                    "INSERT INTO dag_run_note (dag_run_id, content, created_at, updated_at) "
                    "VALUES (%s, %s, now(), now()) ON CONFLICT (dag_run_id) "
                    "DO UPDATE SET content = EXCLUDED.content, updated_at = now()",
                    (run_id, note),
                )
        conn.commit()
    finally:
        conn.close()


def _failed(shown: progress.Stage, message: str) -> None:
    """End the stage as failed; with no stage lines (``--quiet``) say it on stderr."""
    shown.fail(message)
    if progress.current() is None:
        print(message, file=sys.stderr)


@contextmanager
def _night_stages(settings: Settings, use_case: str, night: date) -> Iterator[None]:
    """Show the stages of a night another process runs, read from its ledger row as each ends.

    The night's own process (``airflow dags test``) shows nothing; the ledger records each
    stage with its seconds, which is polled here once a second.
    """
    reporter = progress.current()
    if reporter is None:
        yield
        return
    conn = db.connect(settings.database_url, autocommit=True)
    stop = threading.Event()
    shown: set[str] = set()

    def poll() -> None:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT stages FROM ml.runs WHERE use_case = %s AND score_date = %s "
                "AND started_at >= %s ORDER BY started_at DESC LIMIT 1",
                (use_case, night, since),
            )
            row = cur.fetchone()
        for name, seconds, error in ended_stages(row[0] if row else None, shown):
            reporter.finished(name, seconds, error)

    def watch() -> None:
        while not stop.wait(1.0):
            poll()

    try:
        with conn.cursor() as cur:
            cur.execute("SELECT now()")
            since = cur.fetchone()[0]
        watcher = threading.Thread(target=watch, name="night-stages", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            poll()  # the stages that ended since the last look
    finally:
        conn.close()


def ended_stages(
    stages: dict[str, Any] | None, shown: set[str]
) -> list[tuple[str, float | None, str | None]]:
    """The stages of a ledger row not shown yet, in the night's order: (name, seconds, error).

    Adds them to ``shown``.
    """
    order = {name: i for i, name in enumerate(ledger.NIGHT_STAGES)}

    def position(name: str) -> tuple[int, int, str]:
        base, _, number = name.rpartition("_")  # score_partition_3
        if number.isdigit() and base in order:
            return order[base], int(number), name
        return order.get(name, len(order)), 0, name

    fresh = sorted((name for name in stages or {} if name not in shown), key=position)
    shown.update(fresh)
    out = []
    for name in fresh:
        info = (stages or {})[name]
        error = (
            None if info.get("status", "ok") == "ok" else progress.one_line(info.get("error", ""))
        )
        seconds = info.get("seconds")
        out.append((name, float(seconds) if seconds is not None else None, error))
    return out


@contextmanager
def local_mailbox(folder: Path) -> Iterator[dict[str, str]]:
    """A local SMTP server that files every message it receives under ``folder``.

    Yields the environment that points Airflow's ``nightscore_smtp`` connection at it (a
    plain server: the extras tell Airflow's SMTP hook, which the alerts use, no SSL or TLS).
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
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": port,
                    "extra": {"disable_ssl": True, "disable_tls": True},
                }
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
            f"  uplift once matured (first selections): churn {u['contacted_rate']:.1%} of "
            f"{u['contacted']:,} contacted vs {u['control_rate']:.1%} of {u['control']:,} in control: "
            f"{100 * u['uplift']:+.1f} pp (95% CI {100 * u['ci_low']:+.1f} .. {100 * u['ci_high']:+.1f})"
        )
    return "\n".join(lines)


def experiment_text(settings: Settings, start: date) -> str:
    """The campaign as an experiment, against the simulator's truth.

    (a) The uplift pooled over the weekly cohorts of risk targeting, beside the true effect
    of those emails on the contacted (each send's outcome against its counterfactual, the
    weeks weighted as the pooled estimate weighs them). (b) On the nights ranked by the
    uplift policy, the cancellations an email prevents per 1,000 sent (the simulator's
    expected ``saved`` at that night's hazard) for the audience the policy chose, for the
    one ranking by risk would have chosen, and for the best possible one.
    """
    import numpy as np

    from pipeline.campaigns import experiment, monitor, policy, selection
    from pipeline.conf import config
    from pipeline.synthetic import warehouse

    uc = usecase.load("churn")
    s = config.load_settings(uc=uc)
    truth = db.quote_ident(warehouse.truth_schema(s))
    wh = db.quote_ident(s.warehouse_schema)
    pooled = monitor.campaign_experiment(s, uc)
    assert pooled is not None and uc.campaign is not None
    lines = ["the campaign as an experiment (against the simulator's truth):"]
    lines.append(f"  pooled uplift: {pooled['text']}")
    horizon = uc.label.horizon_days
    # the estimate compares first selections: the truth of the customers emailed for the
    # first time (those emails and any the campaign sent them within the horizon)
    per_week = db.read_arrow(
        s.warehouse_url,
        "SELECT e.contact_date, avg(coalesce(e.counterfactual_cancel_date < e.contact_date + "
        f"{horizon}, false)::int - coalesce(c.cancel_date < e.contact_date + {horizon}, false)"
        f"::int) AS att, count(*) AS n FROM {truth}.exposures e "
        f"LEFT JOIN {wh}.cancellations c USING (customer_id) WHERE NOT EXISTS (SELECT 1 "
        f"FROM {truth}.exposures f WHERE f.customer_id = e.customer_id "
        "AND f.contact_date < e.contact_date) GROUP BY 1",
    ).to_pylist()
    att = {experiment.week_of(db.to_date(r["contact_date"])).isoformat(): r for r in per_week}
    weights = {
        c["week"]: experiment.cohort_weight(c["contacted"], c["control"]) for c in pooled["cohorts"]
    }
    measured = [w for w in weights if w in att]
    if measured:
        true = sum(weights[w] * float(att[w]["att"] or 0) for w in measured) / sum(
            weights[w] for w in measured
        )
        covered = pooled["ci_low"] <= true <= pooled["ci_high"]
        lines.append(
            f"  true effect of those emails on the first contacted: {true * 100:+.1f} pp "
            f"({'inside' if covered else 'OUTSIDE'} the interval; interval "
            f"{'excludes' if pooled['conclusive'] else 'includes'} 0)"
        )
    lines.append(f"  targeting policy: {policy.policy_text(s, uc)}")
    challenger = policy.newest_policy(s, uc)
    if challenger is None:
        return "\n".join(lines)
    newest = challenger["version"]
    nights = [start + timedelta(days=d) for d in UPLIFT_NIGHTS]
    totals: dict[str, list[np.ndarray]] = {"uplift": [], "risk": [], "best": []}
    for night in nights:
        truth_of = db.read_arrow(
            s.warehouse_url,
            f"SELECT customer_id, saved FROM {truth}.effects WHERE as_of = :d",
            {"d": night},
        )
        by_risk = selection.select(s, uc, night, rank_by=policy.RISK)
        by_uplift = selection.select(s, uc, night, version=newest)
        key = uc.entity_key
        totals["risk"].append(_saved(truth_of, by_risk.audience.column(key)))
        totals["uplift"].append(_saved(truth_of, by_uplift.audience.column(key)))
        # the best the band allows: the same number of emails to whom they save most
        best = -np.sort(-_saved(truth_of, by_risk.band.column(key)))
        totals["best"].append(best[: len(by_risk.chosen)])
    per_1000 = {
        k: 1000 * float(np.concatenate(v).sum()) / max(sum(map(len, v)), 1)
        for k, v in totals.items()
    }
    lines.append(
        f"  saved per 1,000 emails on the same nights ({', '.join(map(str, nights))}; the "
        f"simulator's expected cancellations prevented): ranked by risk "
        f"{per_1000['risk']:.1f} ({sum(map(len, totals['risk'])):,} emails), by uplift policy "
        f"{newest} {per_1000['uplift']:.1f} ({sum(map(len, totals['uplift'])):,} emails), "
        f"best possible in the band {per_1000['best']:.1f}"
    )
    ev = challenger["evidence"]
    q, a = ev["qini"], ev["auuc"]
    lines.append(
        f"  {newest} out of time ({', '.join(ev['holdout_weeks'])}): Qini "
        f"{q['challenger']['estimate']:+.4f} ({q['challenger']['low']:+.4f} .. "
        f"{q['challenger']['high']:+.4f}) vs {ev['incumbent']} {q['champion']['estimate']:+.4f}; "
        f"AUUC {a['challenger']['estimate']:.4f} ({a['challenger']['low']:.4f} .. "
        f"{a['challenger']['high']:.4f}) vs {a['incumbent']['estimate']:.4f}"
    )
    return "\n".join(lines)


def _saved(truth: Any, people: Any) -> Any:
    """Each of ``people``'s (entity keys) expected cancellations prevented by an email that
    night, from the simulator's ``effects`` rows ``truth`` (0 for anyone not in them)."""
    import numpy as np

    from pipeline.core import keys

    value, found = keys.lookup(
        keys.to_numpy(truth.column("customer_id")),
        truth.column("saved").to_numpy().astype(np.float64),
        keys.to_numpy(people),
    )
    return np.where(found, value, 0.0)
