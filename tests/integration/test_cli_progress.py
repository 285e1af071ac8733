"""``nightscore warehouse seed`` shows each stage with its elapsed time on stderr; stdout is
unchanged, and ``--quiet`` shows nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import create_database, drop_database

BIN = Path(sys.executable).parent
STAGES = ("create_tables", "simulate_days", "index_and_analyze")


@pytest.fixture(scope="module")
def empty_database(server_url: str, session_id: str) -> Iterator[str]:
    name = f"nightscore_test_{session_id}_cli_progress"
    yield create_database(server_url, name)
    drop_database(server_url, name)


def seed(url: str, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "NIGHTSCORE_DATABASE_URL": url,
        "NIGHTSCORE_HOME": str(home),
        "NIGHTSCORE_DB_ROLE": "",
    }
    env.pop("NO_COLOR", None)
    args = [str(BIN / "nightscore"), *extra, "warehouse", "seed", "--customers", "300"]
    result = subprocess.run(
        [*args, "--start", "2024-01-01", "--days", "60", "--seed", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_warehouse_seed_shows_each_stage_with_its_elapsed_time_on_stderr(
    empty_database: str, tmp_path: Path
) -> None:
    result = seed(empty_database, tmp_path)
    lines = result.stderr.splitlines()
    for stage in STAGES:
        assert f"▸ {stage} …" in lines, result.stderr
        assert any(re.fullmatch(rf"✓ {stage}  \d+\.\d s", line) for line in lines), result.stderr
    ends = [line.split()[1] for line in lines if line.startswith("✓ ")]
    assert ends == list(STAGES)
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # not a terminal
    # stdout is what it was: one line a script can read
    out = re.fullmatch(
        r"warehouse holds (\S+) \.\. (\S+) \(([\d,]+) customers\); wrote (.+) in [\d.]+s\n",
        result.stdout,
    )
    assert out is not None, result.stdout
    assert out.group(1, 2) == ("2024-01-01", "2024-02-29")
    assert "usage_daily" in out.group(4)


def test_quiet_seed_writes_nothing_to_stderr(empty_database: str, tmp_path: Path) -> None:
    result = seed(empty_database, tmp_path, "--quiet")
    assert result.stderr == ""
    assert result.stdout.startswith("warehouse holds 2024-01-01 .. 2024-02-29")
