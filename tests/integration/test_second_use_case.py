"""A second model on the telco warehouse (usecases/late_payment/: another population and
label), and ``nightscore usecase check`` on good and broken use cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.faces import preflight
from pipeline.run import nightly
from pipeline.store import db
from tests.conftest import SCORE_DATE

REPO_USECASES = Path(__file__).resolve().parents[2] / "usecases"


@pytest.fixture
def checked_against(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``usecase check`` reads the deployment settings from the environment, as the CLI does."""
    monkeypatch.setenv("NIGHTSCORE_DATABASE_URL", isolated.database_url)
    monkeypatch.setenv("NIGHTSCORE_WAREHOUSE_URL", isolated.warehouse_url)
    monkeypatch.setenv("NIGHTSCORE_DB_ROLE", "")
    return isolated


def items(report: preflight.Report) -> dict[str, tuple[str, str]]:
    return {i.name: (i.status, i.detail) for i in report.items}


def test_late_payment_checks_out_and_publishes_its_own_table(checked_against: Settings) -> None:
    report = preflight.check("late_payment", SCORE_DATE)
    assert report.ok, report.text()
    uc = usecase.load("late_payment")
    out = nightly.run_night(checked_against, uc, SCORE_DATE, retrain="always", run_id="late-1")
    assert out["evaluation"]["decision"] == "promote"
    served = db.scalar(
        checked_against.database_url,
        "SELECT json_build_object('rows', count(*), 'positive_rate', avg(late_probability)) "
        "FROM predictions.late_payment_scores_latest",
    )
    assert served["rows"] == out["published"]["rows"] > 1000
    # its population is billed customers only: fewer than churn's active customers
    active = db.scalar(
        checked_against.warehouse_url,
        "SELECT count(*) FROM warehouse.customers c WHERE signup_date < %s AND NOT EXISTS "
        "(SELECT 1 FROM warehouse.cancellations x WHERE x.customer_id = c.customer_id "
        "AND x.cancel_date < %s)",
        (SCORE_DATE, SCORE_DATE),
    )
    assert served["rows"] < active
    assert out["model_version"].startswith("late_payment-")


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "churn"
    shutil.copytree(REPO_USECASES / "churn", folder)
    monkeypatch.setenv(usecase.ENV_USECASES, str(tmp_path))
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_broken_use_case_fails_item_by_item_with_what_to_change(
    checked_against: Settings, broken: Path
) -> None:
    edit(broken / "contract.yaml", "      data_mb: integer", "      data_mb: text")
    edit(broken / "labels.sql", "CAST(c.customer_id AS bigint) AS customer_id,", "c.customer_id,,")
    edit(broken / "usecase.yaml", "snapshots: 6 ", "snapshots: 40 ")
    report = preflight.check("churn", SCORE_DATE)
    found = items(report)
    assert not report.ok
    assert (
        found["contract"][0] == "FAIL"
        and "column_type on warehouse.usage_daily.data_mb" in found["contract"][1]
    )
    assert found["history"][0] == "FAIL"
    assert "days missing" in found["history"][1] and "training.snapshots" in found["history"][1]
    assert found["features"][0] == "ok"
    assert found["labels"][0] == "FAIL" and "labels.sql" in found["labels"][1]
    assert found["class balance"][0] == "skip"
    assert "item(s) failed" in report.text().splitlines()[-1]


def test_too_few_holdout_positives_for_the_gates_is_named_with_the_knobs(
    checked_against: Settings, broken: Path
) -> None:
    edit(broken / "usecase.yaml", "\ngates:\n", "\ngates:\n  min_holdout_positives: 5000\n")
    found = items(preflight.check("churn", SCORE_DATE))
    status, detail = found["holdout positives"]
    assert status == "FAIL" and "gates.min_holdout_positives" in detail
    assert "label.horizon_days" in detail and "training.holdout_snapshots" in detail


def test_a_thin_holdout_is_told_to_pool_dates(checked_against: Settings, broken: Path) -> None:
    edit(broken / "usecase.yaml", "\ngates:\n", "\ngates:\n  min_holdout_positives: 1\n")
    found = items(preflight.check("churn", SCORE_DATE))
    status, detail = found["holdout positives"]
    positives = int(detail.split()[0])
    if positives >= preflight.POOL_BELOW:
        pytest.skip(f"this warehouse's holdout has {positives} positives")
    assert status == "warn" and "training.holdout_snapshots 2 or 3" in detail


def test_a_warehouse_without_dated_history_is_refused_with_what_is_needed(
    checked_against: Settings, broken: Path
) -> None:
    (broken / "contract.yaml").write_text(
        "tables:\n  customers:\n    columns: {customer_id: integer, country: text}\n"
    )
    status, detail = items(preflight.check("churn", SCORE_DATE))["history"]
    assert status == "FAIL"
    assert "no table with a date_column" in detail and "dated facts" in detail
