"""The alert's message and the notifier's arguments, from plain inputs."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from pipeline.conf import sections, usecase
from pipeline.core.errors import ConfigError
from pipeline.run import alerts

UC = usecase.load("churn")


def alert(kind: str = "failed", what: str = "failed at check_sources: 3 orphans") -> alerts.Alert:
    return alerts.Alert(
        use_case="churn",
        score_date=date(2026, 12, 5),
        run_id="scheduled__2026-12-05T00:00:00+00:00",
        kind=kind,  # type: ignore[arg-type]
        what=what,
        progress="Done: start_run.",
        served="Still served: the night of 2026-12-04.",
        report_url="http://127.0.0.1:8080/nightscore/runs/churn_nightly/x",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6h", timedelta(hours=6)),
        ("90m", timedelta(minutes=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert sections.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["soon", "", "0h", "6", "-1h"])
def test_a_deadline_that_is_not_a_duration_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        UC.evolve({"schedule": {"deadline": text}})
    assert "deadline" in str(err.value) and "'6h'" in str(err.value)


def test_the_message_names_the_use_case_the_date_what_is_served_and_the_report() -> None:
    a = alert()
    assert a.subject == "[nightscore] churn: the night of 2026-12-05 failed"
    for part in ("check_sources: 3 orphans", "Still served", "/nightscore/runs/churn_nightly/x"):
        assert part in a.text and part in a.html
    late = alert("late", "not published by its deadline")
    assert late.subject.endswith("is not published by its deadline")


def test_the_email_defaults_carry_the_recipients_the_connection_and_the_message() -> None:
    uc = UC.evolve({"alerts": {"to": ["oncall@example.com"]}})
    args = alerts.notifier_arguments(uc, alert(), "nightscore_smtp")
    assert args["to"] == ["oncall@example.com"]
    assert args["smtp_conn_id"] == "nightscore_smtp"
    assert args["subject"] == alert().subject
    assert "check_sources: 3 orphans" in args["html_content"]


def test_any_notifier_gets_its_own_options_with_the_message_filled_in() -> None:
    uc = UC.evolve(
        {
            "alerts": {
                "notifier": "airflow.providers.slack.notifications.slack.SlackNotifier",
                "options": {"channel": "#ml", "text": "{subject}\n{text}", "retries": 2},
            }
        }
    )
    args = alerts.notifier_arguments(uc, alert(), "nightscore_smtp")
    assert args == {"channel": "#ml", "text": alert().subject + "\n" + alert().text, "retries": 2}


def test_text_that_looks_like_a_template_reaches_the_notifier_as_it_is() -> None:
    uc = UC.evolve({"alerts": {"to": ["oncall@example.com"]}})
    args = alerts.notifier_arguments(uc, alert(what="bad value {{ x }}"), "c")
    assert args["html_content"].startswith("{% raw %}") and "{{ x }}" in args["html_content"]
