"""``make demo``: seed a small warehouse, run the nightly DAG for a few nights, summarize.

Each night the warehouse first receives the previous day's facts (``advance``), then
``airflow dags test churn_nightly <date>`` runs the real DAG against the embedded (or
configured) PostgreSQL. The summary is read back from the run ledger.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from pipeline import airflow_env, db, ledger, warehouse
from pipeline.config import Settings, load_settings, redact

DEMO_START = date(2024, 1, 1)
STAGES = (
    "build_features",
    "train_challenger",
    "evaluate_challenger",
    "select_model",
    "score",
    "publish_scores",
    "score_shadow",
)


def _airflow(settings: Settings, args: list[str], log_path: Path) -> int:
    env = os.environ | airflow_env.airflow_env(settings)
    airflow = Path(sys.executable).with_name("airflow")
    with log_path.open("w") as fh:
        return subprocess.call([str(airflow), *args], env=env, stdout=fh, stderr=subprocess.STDOUT)


def reset_serving(settings: Settings) -> None:
    """Drop and recreate the serving schemas so the demo starts from an empty registry."""
    conn = db.connect(settings.init_url)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS ml, predictions, monitoring, campaigns CASCADE")
        conn.commit()
    finally:
        conn.close()
    db.apply_schema(settings.init_url)


def run(customers: int, months: int, nights: int, seed: int) -> int:
    began = time.monotonic()
    settings = load_settings()
    logs = settings.home / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    first_night = DEMO_START + timedelta(days=round(months * 30.44))
    print(f"serving database: {redact(settings.database_url)}")
    print(
        f"seeding the warehouse: {customers:,} customers, {DEMO_START} .. {first_night - timedelta(days=1)}"
    )
    seeded = warehouse.seed(settings, customers, DEMO_START, (first_night - DEMO_START).days, seed)
    print(f"  {sum(seeded.rows.values()):,} rows in {seeded.seconds:.1f}s")
    reset_serving(settings)
    print("preparing Airflow's metadata database ...")
    if _airflow(settings, ["db", "migrate"], logs / "airflow-db-migrate.log") != 0:
        print(f"airflow db migrate failed; see {logs / 'airflow-db-migrate.log'}", file=sys.stderr)
        return 1
    for i in range(nights):
        night = first_night + timedelta(days=i)
        if i:
            warehouse.advance(settings, night - timedelta(days=1))
        log_path = logs / f"churn_nightly-{night}.log"
        t0 = time.monotonic()
        print(f"night {i + 1}/{nights}: airflow dags test churn_nightly {night} ...", flush=True)
        code = _airflow(settings, ["dags", "test", "churn_nightly", night.isoformat()], log_path)
        status = _night_status(settings, night)
        print(f"  {status} in {time.monotonic() - t0:.0f}s (log: {log_path})")
        if code != 0 or status != "published":
            print(f"night {night} did not publish (exit {code}); see {log_path}", file=sys.stderr)
            return 1
    print()
    print(summary_text(settings, "churn", first_night))
    last = first_night + timedelta(days=nights - 1)
    reports = sorted((settings.home / "reports" / "churn" / "nights").glob(f"{last}.html"))
    if reports:
        print(f"\nnightly report for {last}: {reports[-1]}")
    print(f"\ndemo finished in {time.monotonic() - began:.0f}s")
    return 0


def _night_status(settings: Settings, night: date) -> str:
    rows = [r for r in ledger.runs(settings, "churn", night) if r["score_date"] == night]
    return rows[-1]["status"] if rows else "no ledger row"


def summary_text(settings: Settings, use_case: str, since: date | None) -> str:
    """Per night: model version, its out-of-time AUC, rows published, seconds per stage."""
    rows = ledger.runs(settings, use_case, since)
    head = (
        f"{'score_date':10}  {'status':9}  {'model_version':25} {'AUC':>6}  {'rows':>8}  "
        + "  ".join(f"{s[:9]:>9}" for s in STAGES)
    )
    lines = ["per night (seconds per stage):", head]
    for r in rows:
        stages = r["stages"] or {}
        secs = []
        for s in STAGES:
            if s == "score":
                parts = [
                    v["seconds"] for k, v in stages.items() if k.startswith("score_partition_")
                ]
                secs.append(sum(parts) if parts else None)
            else:
                secs.append(stages.get(s, {}).get("seconds"))
        cells = "  ".join(f"{x:9.2f}" if x is not None else f"{'-':>9}" for x in secs)
        auc = f"{r['model_auc']:.3f}" if r["model_auc"] is not None else "-"
        published = r["rows_published"] or 0
        lines.append(
            f"{r['score_date']!s:10}  {r['status']:9}  {r['model_version'] or '-':25} {auc:>6}  {published:>8,}  {cells}"
        )
        ev = stages.get("evaluate_challenger", {})
        if ev.get("decision"):
            lines.append(
                f"{'':12}challenger {stages['train_challenger'].get('version')}: {ev['decision']}"
                f" ({'; '.join(ev.get('reasons', []))})"
            )
            lines.append(f"{'':12}evaluation report: {ev.get('report')}")
        pub = stages.get("publish_scores", {})
        if pub.get("rows_per_second"):
            lines.append(
                f"{'':12}published {pub['rows']:,} rows at {pub['rows_per_second']:,} rows/s"
            )
        sh = stages.get("score_shadow", {})
        if sh.get("shadow"):
            lines.append(
                f"{'':12}shadow {sh['shadow']}: spearman {sh['spearman']:.3f}, top-decile overlap "
                f"{sh['top_decile_overlap']:.2f}, audience +{sh['audience_enter']:.0f}/-{sh['audience_leave']:.0f}"
            )
    lines += [
        "",
        "read the predictions:",
        '  psql "$(.venv/bin/nightscore db url)" -c "SELECT customer_id, churn_probability, risk_decile, '
        'model_version FROM predictions.churn_scores_latest ORDER BY churn_probability DESC LIMIT 10"',
    ]
    return "\n".join(lines)
