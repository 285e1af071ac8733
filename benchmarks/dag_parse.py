"""DAG parse time of the factory with 1 and 10 use cases (what the DAG processor pays per parse).

    .venv/bin/python benchmarks/dag_parse.py [--use-cases 1 10] [--repeat 5]

Each count gets a folder of copies of the churn use case (renamed, each with its own served
table) and a fresh interpreter, which imports Airflow once and then parses ``dags/`` with
``DagBag`` ``--repeat`` times (best time printed). Alongside, the part of it that is reading
and validating the use case files (``usecase.discover``), and the DAG count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
from pipeline.conf import usecase
repeat = int(sys.argv[1])
parse, config = [], []
for _ in range(repeat):
    t = time.perf_counter(); bag = DagBag(dag_folder=sys.argv[2]); parse.append(time.perf_counter() - t)
    t = time.perf_counter(); usecase.discover(); config.append(time.perf_counter() - t)
print(json.dumps({"dags": len(bag.dag_ids), "errors": len(bag.import_errors),
                  "parse": min(parse), "config": min(config)}))
"""


def folder_of(copies: int, root: Path) -> Path:
    target = root / f"usecases_{copies}"
    for i in range(copies):
        name = "churn" if i == 0 else f"churn{i}"
        dest = target / name
        shutil.copytree(REPO / "usecases" / "churn", dest)
        text = (dest / "usecase.yaml").read_text()
        text = text.replace("name: churn\n", f"name: {name}\n")
        text = text.replace("table: churn_scores", f"table: {name}_scores")
        (dest / "usecase.yaml").write_text(text)
    return target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--use-cases", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = root / "airflow"
        print(f"{'use cases':>9} {'DAGs':>5} {'parse s':>8} {'of which config s':>18}")
        for n in args.use_cases:
            env = os.environ | {
                "NIGHTSCORE_USECASES": str(folder_of(n, root)),
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            }
            out = subprocess.run(
                [sys.executable, "-c", PROBE, str(args.repeat), str(REPO / "dags")],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["errors"] == 0, out.stderr[-2000:]
            print(f"{n:>9} {r['dags']:>5} {r['parse']:>8.3f} {r['config']:>18.3f}")


if __name__ == "__main__":
    main()
