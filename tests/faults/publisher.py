"""A publish in its own process, so fault tests can SIGKILL it or terminate its backend.

python -m tests.faults.publisher '<json: database_url, home, score_date, run_id, model_version, parts, rows>'
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.stages import publish
from pipeline.stages.score import ScoredPart
from pipeline.store import ledger


def child_settings(args: dict) -> Settings:
    """Settings of a child process: one database for serving and warehouse, its own home."""
    return Settings(
        database_url=args["database_url"],
        warehouse_url=args["database_url"],
        home=Path(args["home"]),
    )


def main() -> int:
    args = json.loads(sys.argv[1])
    settings = child_settings(args)
    run = ledger.RunContext("churn", date.fromisoformat(args["score_date"]), args["run_id"])
    ledger.start(settings, run)
    parts = [ScoredPart.from_xcom(p) for p in args["parts"]]
    publish.publish_scores(
        settings, usecase.load("churn"), run, args["model_version"], parts, args["rows"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
