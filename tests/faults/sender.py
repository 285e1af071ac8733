"""A campaign send in its own process, so fault tests can SIGKILL it mid-way.

python -m tests.faults.sender '<json: database_url, home, score_date, run_id, smtp_port>'
"""

from __future__ import annotations

import json
import sys
from datetime import date

from pipeline.campaigns import sending
from pipeline.conf import usecase
from tests.faults.publisher import child_settings


def main() -> int:
    args = json.loads(sys.argv[1])
    settings = child_settings(args)
    out = sending.send_campaign(
        settings,
        usecase.load("churn"),
        date.fromisoformat(args["score_date"]),
        args["run_id"],
        target=sending.SmtpTarget("127.0.0.1", int(args["smtp_port"])),
        dry_run=False,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
