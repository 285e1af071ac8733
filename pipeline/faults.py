"""Fault injection points: where tests stop a long operation to kill it mid-way."""

from __future__ import annotations

import os
import time


def fault_point(name: str, occurrence: int | None = None) -> None:
    """Where fault-injection tests stop a publish or a send (``NIGHTSCORE_FAULT_PAUSE=<name>``,
    or ``<name>:<n>`` for the n-th time a loop passes the point).

    Does nothing unless that variable names this point: then it touches
    ``$NIGHTSCORE_FAULT_PAUSE_FILE`` and sleeps, so a test can kill the process (or its
    database backend) at exactly this step.
    """
    wanted = os.environ.get("NIGHTSCORE_FAULT_PAUSE")
    if wanted != name and (occurrence is None or wanted != f"{name}:{occurrence}"):
        return
    marker = os.environ.get("NIGHTSCORE_FAULT_PAUSE_FILE")
    if marker:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
    time.sleep(float(os.environ.get("NIGHTSCORE_FAULT_PAUSE_SECONDS", "600")))
