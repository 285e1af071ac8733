"""Temporary files left by killed writers are swept; a live writer's are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.core import files


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def left_by(pid: int, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    path = files.temporary(final)
    path = path.with_name(path.name.replace(f"-{os.getpid()}.tmp", f"-{pid}.tmp"))
    path.write_bytes(b"half")
    return path


def test_sweep_removes_what_dead_writers_left_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = left_by(dead_pid(), tmp_path / "part-0000.parquet")
    mine = left_by(os.getpid(), tmp_path / "part-0001.parquet")
    done = tmp_path / "part-0002.parquet"
    done.write_bytes(b"whole")

    assert files.sweep(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and done.exists()


def test_a_recursive_sweep_reaches_the_folders_of_other_attempts(tmp_path: Path) -> None:
    other = left_by(dead_pid(), tmp_path / "cli__killed" / "part-0000.parquet")

    assert files.sweep(tmp_path) == []
    assert other.exists()
    assert files.sweep(tmp_path, recursive=True) == [other]
    assert not other.exists()
