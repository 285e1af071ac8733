"""Fixtures for fault injection: one scored night whose publish is replayed under faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def night(isolated: Settings) -> dict[str, Any]:
    """A published night; its scored parts stay on disk for the replays."""
    out = nightly.run_night(
        isolated, usecase.load("churn"), SCORE_DATE, retrain="always", run_id="faults-base"
    )
    stages = db.scalar(
        isolated.database_url, "SELECT stages FROM ml.runs WHERE run_id = 'faults-base'"
    )
    parts = []
    for p in range(usecase.load("churn").serving.partitions):
        parts.append({"partition": p, "rows": stages[f"score_partition_{p}"]["rows"]})
    folder = isolated.scores / "churn" / SCORE_DATE.isoformat() / "faults-base"
    for p in parts:
        p["path"] = str(next(folder.glob(f"part-{p['partition']:04d}-*.parquet")))
    return {"model_version": out["model_version"], "rows": out["published"]["rows"], "parts": parts}


def spawn(
    module: str, args: dict[str, Any], pause: str | None, marker: Path, pause_seconds: float = 600
) -> subprocess.Popen:
    """Run ``python -m <module> <args as JSON>``; with ``pause``, return once it stops there."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    if pause:
        env |= {
            "NIGHTSCORE_FAULT_PAUSE": pause,
            "NIGHTSCORE_FAULT_PAUSE_FILE": str(marker),
            "NIGHTSCORE_FAULT_PAUSE_SECONDS": str(pause_seconds),
        }
    proc = subprocess.Popen(
        [sys.executable, "-m", module, json.dumps(args)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if pause:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{module} exited before reaching {pause}: {proc.stdout.read()}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{module} never reached {pause}")
            time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen) -> str:
    """SIGKILL a child; returns what it printed."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return proc.stdout.read()


class Publisher:
    """Start a publish in a child process, paused at a named fault point."""

    def __init__(self, settings: Settings, night: dict[str, Any], tmp: Path):
        self.settings, self.night, self.tmp = settings, night, tmp
        self.count = 0

    def start(
        self, pause: str | None, pause_seconds: float = 600, day: date = SCORE_DATE
    ) -> tuple[subprocess.Popen, str]:
        self.count += 1
        run_id = f"faults-{self.count}-{pause or 'clean'}"
        args = {
            "database_url": self.settings.database_url,
            "home": str(self.settings.home),
            "score_date": day.isoformat(),
            "run_id": run_id,
            "model_version": self.night["model_version"],
            "parts": self.night["parts"],
            "rows": self.night["rows"],
        }
        marker = self.tmp / f"{run_id}.paused"
        return spawn("tests.faults.publisher", args, pause, marker, pause_seconds), run_id

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        kill(proc)


@pytest.fixture
def publisher(isolated: Settings, night: dict[str, Any], tmp_path: Path) -> Publisher:
    return Publisher(isolated, night, tmp_path)
