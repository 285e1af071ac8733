"""Run ``churn_nightly`` through Airflow once per warehouse schema, in one process.

``python tests/faults/dag_catalogue.py SPEC.json OUT.jsonl``: SPEC names the logical date
and, per case, the warehouse schema and the run conf. Each case is the same
``dag.test()`` that ``airflow dags test`` runs (one Airflow start-up for the whole
catalogue instead of one per case). Every run of the date has the same run id, so the
outcome of each case (task states, its ledger row, what was published) is read right
after it and written as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from airflow.utils.cli import get_bagged_dag

    from pipeline.conf.config import load_settings
    from pipeline.store import db

    spec = json.loads(Path(spec_path).read_text())
    night = datetime.fromisoformat(spec["night"]).replace(tzinfo=UTC)
    dag = get_bagged_dag(bundle_names=None, dag_id="churn_nightly")
    with open(out_path, "w") as out:
        for case in spec["cases"]:
            os.environ["NIGHTSCORE_WAREHOUSE_SCHEMA"] = case["schema"]
            url = load_settings().database_url
            began = db.scalar(url, "SELECT now()")
            dr = dag.test(logical_date=night, run_conf=case.get("conf"))
            states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
            run = db.scalar(
                url,
                "SELECT json_build_object('status', status, 'error', error, "
                "'stages', stages, 'run_id', run_id) FROM ml.runs "
                "WHERE use_case = 'churn' AND score_date = %s AND run_id = %s",
                (night.date(), dr.run_id),
            )
            checks = db.scalar(
                url,
                "SELECT coalesce(json_agg(json_build_object('check', check_name, 'target', target, "
                "'severity', severity, 'passed', passed)), '[]') FROM monitoring.checks "
                "WHERE run_id = %s AND score_date = %s AND checked_at >= %s",
                (dr.run_id, night.date(), began),
            )
            published = db.scalar(
                url,
                "SELECT count(*) FROM predictions.churn_scores WHERE score_date = %s",
                (night.date(),),
            )
            latest = db.scalar(
                url,
                "SELECT json_build_array(min(score_date), count(*)) "
                "FROM predictions.churn_scores_latest",
            )
            line = {
                "case": case["case"],
                "dag_run_state": str(dr.state),
                "tasks": states,
                "run": run,
                "checks": checks,
                "published": published,
                "latest": latest,
            }
            out.write(json.dumps(line, default=str) + "\n")
            out.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
