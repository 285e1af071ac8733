"""``nightscore stop`` stops what ``make airflow`` and ``make demo`` leave running, and the
commands find the project's home from a subfolder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.conf import config, embedded
from pipeline.core import paths
from pipeline.faces import cli
from pipeline.faces.airflow_env import _pid_file


def _sleeper(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *argv])


def test_stop_ends_the_local_airflow_and_the_embedded_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / ".nightscore"
    monkeypatch.setenv(config.ENV_HOME, str(home))
    embedded.ensure_server(home)
    assert (home / "pgdata" / "postmaster.pid").exists()
    local = _sleeper("nightscore", "airflow")  # stands for `nightscore airflow`
    _pid_file(home).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(home).write_text(str(local.pid))
    try:
        assert cli.main(["--quiet", "stop"]) == 0
        assert local.wait(30) is not None  # terminated
        assert not (home / "pgdata" / "postmaster.pid").exists()
        assert not _pid_file(home).exists()
        said = capsys.readouterr().out
        assert f"stopped the local Airflow (process {local.pid})" in said
        assert f"stopped the embedded PostgreSQL of {home}" in said
        # nothing left: said so
        assert cli.main(["--quiet", "stop"]) == 0
        said = capsys.readouterr().out
        assert "no local Airflow runs" in said and "no embedded PostgreSQL runs" in said
    finally:
        local.kill()
        embedded.stop_server(home)


def test_a_record_naming_another_program_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / ".nightscore"
    monkeypatch.setenv(config.ENV_HOME, str(home))
    other = _sleeper("not-ours")  # the recorded id, reused by another program
    _pid_file(home).parent.mkdir(parents=True)
    _pid_file(home).write_text(str(other.pid))
    try:
        assert cli.main(["--quiet", "stop"]) == 0
        assert other.poll() is None  # still running
        assert not _pid_file(home).exists()  # the stale record is gone
    finally:
        other.kill()


def test_the_home_is_found_from_a_subfolder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.ENV_HOME, raising=False)
    (tmp_path / "project" / ".nightscore").mkdir(parents=True)
    deep = tmp_path / "project" / "usecases" / "seats"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert config.home_dir() == tmp_path / "project" / ".nightscore"
    # none above: the checkout's own
    monkeypatch.chdir(tmp_path)
    assert config.home_dir() == paths.REPO_ROOT / ".nightscore"
    monkeypatch.setenv(config.ENV_HOME, str(tmp_path / "chosen"))
    assert config.home_dir() == tmp_path / "chosen"
