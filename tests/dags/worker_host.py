"""The host name a test's Celery worker reports to Airflow (``[core] hostname_callable``), so
that two workers on one machine show as the two machines they stand for.

Imported by the workers' task processes: no side effects, nothing from the test suite.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("NIGHTSCORE_TEST_WORKER_HOST") or socket.getfqdn()
