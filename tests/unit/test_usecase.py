"""Use cases are files: discovered at run time, validated, every error names file and key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.conf import config, sections, usecase
from pipeline.core.errors import ConfigError
from pipeline.faces import preflight

REPO_USECASES = Path(__file__).resolve().parents[2] / "usecases"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A use case search path holding a copy of churn as ``mine``."""
    shutil.copytree(REPO_USECASES / "churn", tmp_path / "mine")
    monkeypatch.setenv(usecase.ENV_USECASES, str(tmp_path))
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def test_the_repository_use_cases_are_valid() -> None:
    found = usecase.discover()
    assert {f.name for f in found} >= {"churn", "late_payment"}
    assert all(f.error is None for f in found), [f.error for f in found]
    churn = usecase.load("churn")
    assert (churn.entity_key, churn.entity.type, churn.score_table) == (
        "customer_id",
        "bigint",
        "churn_scores",
    )
    # every file is named in the config and resolved against its folder
    assert churn.sql.features == REPO_USECASES / "churn" / "features.sql"
    assert churn.campaign is not None and churn.campaign.audience_table == "retention_audience"


@pytest.mark.parametrize(
    ("old", "new", "key", "expected", "found"),
    [
        (
            "horizon_days: 30",
            "horizon_day: 30",
            "label.horizon_day",
            "one of horizon_days",
            "unknown key",
        ),
        ("auc_floor: 0.65", "auc_floor: high", "gates.auc_floor", "a valid number", "'high'"),
        ("  type: bigint", "  type: int", "entity.type", "'bigint' or 'text'", "'int'"),
        (
            "features: features.sql ",
            "features: feature.sql ",
            "sql.features",
            "an existing file",
            "'feature.sql'",
        ),
        (
            "table: churn_scores",
            "table: Churn-Scores",
            "serving.table",
            "match pattern",
            "'Churn-Scores'",
        ),
        (
            "  timezone: UTC\n  session:",
            "  timezone: Mars/Olympus\n  session:",
            "warehouse.timezone",
            "IANA time zone",
            "'Mars/Olympus'",
        ),
        ("  key: customer_id\n  type", "  type", "entity.key", "(the key is required)", "nothing"),
        (
            "usage_trend: {max_null_fraction: 0.6}",
            "usage_trend: {max_nulls: 0.6}",
            "feature_checks.features.usage_trend.max_nulls",
            "one of max, max_null_fraction, max_unseen_share, min",
            "unknown key 'max_nulls'",
        ),
        (
            "  partitions: 2\n",
            "  partitions: 2\n  pool: scoring pool\n",
            "serving.pool",
            "match pattern",
            "'scoring pool'",
        ),
        (
            '  nightly: "0 0 * * *"',
            '  nightly: "every night"',
            "schedule.nightly",
            "cron expression",
            "'every night'",
        ),
    ],
)
def test_each_error_names_the_file_the_key_what_was_expected_and_found(
    folder: Path, old: str, new: str, key: str, expected: str, found: str
) -> None:
    edit(folder / "mine" / "usecase.yaml", old, new)
    with pytest.raises(ConfigError) as err:
        usecase.load("churn")
    message = str(err.value)
    assert str(folder / "mine" / "usecase.yaml") in message
    assert f"key {key}:" in message and expected in message and found in message


def test_an_invalid_use_case_is_listed_with_its_error_and_does_not_hide_the_others(
    folder: Path,
) -> None:
    shutil.copytree(REPO_USECASES / "late_payment", folder / "other")
    edit(folder / "mine" / "usecase.yaml", "\ngates:\n", "\ngates:\n  min_holdout_positives: -3\n")
    found = {f.source.parent.name: f for f in usecase.discover()}
    assert found["mine"].error and "gates.min_holdout_positives" in found["mine"].error
    assert found["other"].use_case is not None and usecase.names() == ["late_payment"]


def test_a_syntax_error_names_the_file(folder: Path) -> None:
    edit(folder / "mine" / "usecase.yaml", "entity:\n", "entity: [\n")
    with pytest.raises(ConfigError, match=r"mine/usecase\.yaml: expected valid YAML"):
        usecase.load_file(folder / "mine" / "usecase.yaml")


def test_a_bad_contract_is_an_error_of_its_use_case(folder: Path) -> None:
    edit(folder / "mine" / "contract.yaml", "window_days: 30", "window_days: soon")
    with pytest.raises(ConfigError, match=r"contract\.yaml.*window_days"):
        usecase.load("churn")


def test_two_use_cases_may_not_share_a_name_or_a_served_table(folder: Path) -> None:
    shutil.copytree(folder / "mine", folder / "copy")
    edit(folder / "copy" / "usecase.yaml", "name: churn", "name: churn_copy")
    found = usecase.discover()
    valid = [f for f in found if f.use_case is not None]
    invalid = [f for f in found if f.error is not None]
    assert len(valid) == len(invalid) == 1  # the first found keeps the table
    assert "key serving.table" in str(invalid[0].error) and "churn_scores" in str(invalid[0].error)
    assert str(valid[0].source) in str(invalid[0].error)


def test_unknown_use_case_names_the_known_ones_and_how_to_create_it(folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected one of \[churn\].*usecase init upsell"):
        usecase.load("upsell")


def test_environment_variables_fill_in_values(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTSCORE_WAREHOUSE_SCHEMA", "staging_copy")
    assert usecase.load("churn").warehouse.schema_name == "staging_copy"
    monkeypatch.delenv("NIGHTSCORE_WAREHOUSE_SCHEMA")
    assert usecase.load("churn").warehouse.schema_name == "warehouse"
    edit(
        folder / "mine" / "usecase.yaml",
        "${NIGHTSCORE_WAREHOUSE_SCHEMA:-warehouse}",
        "${NO_SUCH_VAR}",
    )
    with pytest.raises(
        ConfigError, match=r"key warehouse\.schema: expected environment variable NO_SUCH_VAR"
    ):
        usecase.load("churn")


def test_feature_rules_fall_back_to_the_default_key_by_key() -> None:
    policy = usecase.load("churn").feature_checks
    assert policy.rule("usage_trend").max_null_fraction == 0.6
    assert policy.rule("usage_trend").min == 0  # from the default
    assert policy.rule("fee_change_90d").min == -1
    assert policy.rule("anything").max_null_fraction == 0.01
    # with nothing configured, any natural feature passes: nullable, any sign
    bare = sections.FeatureChecks()
    assert bare.rule("balance_trend") == sections.FeatureRule()


def test_each_use_case_reads_its_own_warehouse(monkeypatch: pytest.MonkeyPatch) -> None:
    uc = usecase.load("churn").evolve(
        {"warehouse": {"connection": "crm_dwh", "url_env": "CRM_URL", "schema": "crm"}}
    )
    base = config.Settings(
        database_url="postgresql://s/serving",
        warehouse_url="postgresql://s/serving",
        home=Path("."),
    )
    monkeypatch.delenv("CRM_URL", raising=False)
    monkeypatch.delenv(config.ENV_WAREHOUSE_URL, raising=False)
    fallback = base.for_use_case(uc)
    assert fallback.warehouse_url == "postgresql://s/serving" and fallback.warehouse_schema == "crm"
    assert "crm_dwh" in fallback.warehouse_source and "$CRM_URL" in fallback.warehouse_source
    monkeypatch.setenv("CRM_URL", "postgresql://crm/dwh")
    assert base.for_use_case(uc).warehouse_url == "postgresql://crm/dwh"
    conn = base.for_use_case(uc, connection_url="postgresql://conn/dwh")
    assert conn.warehouse_url == "postgresql://conn/dwh" and "crm_dwh" in conn.warehouse_source


def test_the_skeleton_is_a_valid_use_case(folder: Path) -> None:
    made = preflight.init_skeleton("seats", folder)
    uc = usecase.load("seats")
    assert uc.source == made / "usecase.yaml" and uc.score_table == "seats_scores"
    assert uc.sql.population is not None and uc.campaign is None
    assert "# " in (made / "usecase.yaml").read_text()  # commented
    with pytest.raises(ConfigError, match="exists already"):
        preflight.init_skeleton("seats", folder)
    with pytest.raises(ConfigError, match="use case name"):
        preflight.init_skeleton("Bad Name", folder)


def test_the_default_use_case_is_the_only_one_else_it_must_be_named(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert usecase.default_name() == "churn"
    shutil.copytree(REPO_USECASES / "late_payment", folder / "other")
    with pytest.raises(ConfigError, match="--use-case NAME"):
        usecase.default_name()
    monkeypatch.setenv(usecase.ENV_USE_CASE, "late_payment")
    assert usecase.default_name() == "late_payment"
