"""Fault injection points: where tests stop, kill or break a long operation mid-way."""

from __future__ import annotations

import os
import time

from pipeline.core.errors import DataError


class FaultInjected(DataError):
    """Raised at a fault point a test asked to fail (fails an Airflow task at once, no retry)."""


def fault_point(name: str, occurrence: int | None = None) -> None:
    """Where fault-injection tests stop or break a run, a publish or a send.

    ``NIGHTSCORE_FAULT_PAUSE=<name>`` (or ``<name>:<n>`` for the n-th time a loop passes
    the point, or partition n at ``score_partition``) touches
    ``$NIGHTSCORE_FAULT_PAUSE_FILE`` and sleeps, so a test can kill the process (or its
    database backend) at exactly this step.
    ``NIGHTSCORE_FAULT_RAISE=<name>`` raises ``FaultInjected`` there, and
    ``<name>:interrupt`` raises ``KeyboardInterrupt`` (what Ctrl-C or a task timeout does).
    Does nothing unless a variable names this point.
    """
    failing = os.environ.get("NIGHTSCORE_FAULT_RAISE", "")
    if failing == name:
        raise FaultInjected(f"fault injected at {name}")
    if failing == f"{name}:interrupt":
        raise KeyboardInterrupt(f"fault injected at {name}")
    wanted = os.environ.get("NIGHTSCORE_FAULT_PAUSE")
    if wanted != name and (occurrence is None or wanted != f"{name}:{occurrence}"):
        return
    marker = os.environ.get("NIGHTSCORE_FAULT_PAUSE_FILE")
    if marker:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
    time.sleep(float(os.environ.get("NIGHTSCORE_FAULT_PAUSE_SECONDS", "600")))
