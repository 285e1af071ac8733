"""What must not leak or break: a bad contact stops only its own message, configured names
reach SQL quoted, no secret is printed, files are their owner's, the model card is verified."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from pipeline.campaigns import campaign
from pipeline.campaigns.audience import build_audience
from pipeline.campaigns.sending import SmtpTarget, send_campaign
from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.errors import ConfigError, ModelError, SourceError
from pipeline.run import nightly
from pipeline.stages import features
from pipeline.store import db, registry
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World
from tests.conftest import SCORE_DATE
from tests.smtp_sink import smtp_sink

UC = usecase.load("churn")


@pytest.fixture(scope="module")
def night(isolated: Settings) -> dict:
    old = os.umask(0o022)  # a permissive environment: the pipeline must not rely on it
    try:
        out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="sec-night")
        built = build_audience(isolated, UC, SCORE_DATE)
    finally:
        os.umask(old)
    return {"version": out["model_version"], "audience": built}


def test_a_carriage_return_or_a_bad_address_stops_only_that_message(
    isolated: Settings, night: dict
) -> None:
    rows = db.scalar(
        isolated.database_url,
        "SELECT json_agg(json_build_array(customer_id, email) ORDER BY audience_rank) "
        "FROM campaigns.retention_audience WHERE score_date = %s",
        (SCORE_DATE,),
    )
    crlf, bad = rows[1][0], rows[2][0]
    db.scalar(
        isolated.database_url,
        "UPDATE campaigns.retention_audience SET first_name = E'Ann\\r\\nBcc: x@evil.example' "
        "WHERE customer_id = %s; UPDATE campaigns.retention_audience SET email = "
        "'not an address' WHERE customer_id = %s; SELECT 1",
        (crlf, bad),
    )
    with smtp_sink() as sink:
        out = send_campaign(
            isolated,
            UC,
            SCORE_DATE,
            "sec-send",
            target=SmtpTarget("127.0.0.1", sink.port),
            dry_run=False,
            rate_per_second=500,
        )
        received = sink.received
    assert out["sent"] == len(rows) - 1 and out["failed"] == 1
    log = db.scalar(
        isolated.database_url,
        "SELECT json_object_agg(customer_id, json_build_array(status, error)) "
        "FROM campaigns.retention_send_log WHERE campaign = %s",
        (campaign.campaign_name(UC, SCORE_DATE),),
    )
    assert log[str(bad)][0] == "failed" and "invalid email address" in log[str(bad)][1]
    assert log[str(crlf)][0] == "sent"
    assert not [k for k, (status, _) in log.items() if status == "sending"]
    subjects = [msg["Subject"] for _, msg in received]
    assert any("Ann Bcc: x@evil.example" in s for s in subjects)  # on one line, no new header
    assert all(msg["Bcc"] is None for _, msg in received)
    assert "x@evil.example" not in [r for r, _ in received]


def test_exports_models_and_the_home_are_their_owners_only(isolated: Settings, night: dict) -> None:
    sensitive = [
        *Path(night["audience"]["exports"]["csv"]).parent.iterdir(),
        *(isolated.artifacts / "churn" / night["version"]).iterdir(),
    ]
    assert len(sensitive) >= 4
    for path in sensitive:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, path.parent


def test_the_cli_makes_every_file_under_its_home_private(
    isolated: Settings, tmp_path: Path
) -> None:
    import subprocess
    import sys

    home = tmp_path / "home"
    env = os.environ | {
        "NIGHTSCORE_DATABASE_URL": isolated.database_url,
        "NIGHTSCORE_HOME": str(home),
        "NIGHTSCORE_DB_ROLE": "",
    }
    code = "import os, sys; os.umask(0o022); from pipeline.faces import cli; sys.exit(cli.main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "report", "--use-case", "churn", "--date", str(SCORE_DATE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    made = [p for p in home.rglob("*") if p.is_file()]
    assert made
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in made), [
        (str(p), oct(p.stat().st_mode)) for p in made
    ]


def test_a_changed_model_card_is_refused_like_a_changed_artifact(
    isolated: Settings, night: dict
) -> None:
    mv = registry.get(isolated, "churn", night["version"])
    path = Path(mv.artifact_uri).with_name("model.json")
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b'"reference"', b'"reference" ', 1))
        with pytest.raises(ModelError, match="modified or replaced"):
            registry.card(mv)
        path.unlink()
        with pytest.raises(ModelError, match="missing"):
            registry.card(mv)
    finally:
        path.write_bytes(original)
    assert "reference" in registry.card(mv)


@pytest.mark.parametrize(
    "schema", ["x; DROP SCHEMA warehouse CASCADE; --", "a b", "x.y", "wh'); SELECT 1; --"]
)
def test_a_configured_schema_never_reaches_sql_unquoted(settings: Settings, schema: str) -> None:
    with pytest.raises(ConfigError, match="plain identifier"):
        warehouse.seed(replace(settings, warehouse_schema=schema), World(200, date(2024, 1, 1)), 3)
    with pytest.raises(ConfigError, match="schema"):
        UC.evolve({"warehouse": {"schema": schema}})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nightscore:topsecret@127.0.0.1:1/nowhere",
        "postgresql://nightscore@127.0.0.1:1/nowhere?password=topsecret",
        "postgresql://nightscore@127.0.0.1:1/nowhere?sslmode=disable&password=topsecret",
        "postgresql://nightscore:top%73ecret@127.0.0.1:1/nowhere",
    ],
)
def test_no_error_prints_a_password_however_it_is_given(settings: Settings, url: str) -> None:
    for attempt in (
        lambda: db.connect(url),
        lambda: db.adbc_connect(url),
        lambda: features.build_snapshot(replace(settings, warehouse_url=url), UC, SCORE_DATE),
    ):
        with pytest.raises(SourceError) as err:
            attempt()
        message = str(err.value) + repr(err.value) + str(err.value.__cause__ or "")
        assert "topsecret" not in message and "top%73ecret" not in message
        assert "127.0.0.1:1" in message or "127.0.0.1" in message
