"""Report URLs, and the report web app's path validation (no database, no Airflow)."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pipeline.conf.config import Settings
from pipeline.reports import report_app, report_site


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(database_url="postgresql://unused/none", warehouse_url="", home=tmp_path / "home")
    night = report_site.night_file(s, "churn", date(2024, 11, 20))
    night.parent.mkdir(parents=True)
    night.write_text("<html>night of 2024-11-20</html>")
    ev = report_site.evaluation_file(s, "churn", "churn-20241120-abcdef12")
    ev.parent.mkdir(parents=True)
    ev.write_text("<html>evaluation</html>")
    report_site.night_file(s, "churn", date(2024, 11, 20), 2).write_text(
        "<html>night of 2024-11-20, attempt 2</html>"
    )
    (s.reports / "churn" / "secret.html").write_text("not a report")
    (tmp_path / "home" / "outside.html").write_text("outside")
    return s


def test_report_urls_are_relative_to_the_api_base() -> None:
    assert (
        report_site.report_path("churn", date(2024, 11, 20))
        == "nightscore/churn/nightly/2024-11-20"
    )
    assert (
        report_site.report_path("churn", date(2024, 11, 20), 3)
        == "nightscore/churn/nightly/2024-11-20-attempt-3"
    )
    assert (
        report_site.evaluation_path("churn", "churn-20241120-abcdef12")
        == "nightscore/churn/evaluation/churn-20241120-abcdef12"
    )
    assert (
        report_site.run_path("churn_nightly", "manual__2024-11-20T00:00:00+00:00", evaluation=True)
        == "nightscore/runs/churn_nightly/manual__2024-11-20T00%3A00%3A00%2B00%3A00/evaluation"
    )
    assert report_site.airflow_run_path("churn", "cli__20241120") is None
    assert (
        report_site.airflow_run_path("churn", "scheduled__x")
        == "dags/churn_nightly/runs/scheduled__x"
    )


@pytest.mark.parametrize(
    ("use_case", "kind", "ident"),
    [
        ("churn", "nightly", "2024-11-21"),  # no such night
        ("churn", "nightly", "../secret"),
        ("churn", "nightly", "2024-13-40"),
        ("churn", "nightly", "2024-11-20-attempt-3"),  # no such attempt
        ("churn", "nightly", "2024-11-20-attempt-0"),
        ("churn", "nightly", "2024-11-20-attempt-2.html"),
        ("churn", "nightly", "2024-11-20-attempt-../../secret"),
        ("churn", "evaluation", "..%2fsecret"),
        ("churn", "evaluation", "../../outside"),
        ("churn", "evaluation", ".."),
        ("churn", "secret", "html"),
        ("other", "nightly", "2024-11-20"),  # not a known use case
        ("..", "nightly", "2024-11-20"),
    ],
)
def test_resolve_refuses_anything_but_a_written_report(
    settings: Settings, use_case: str, kind: str, ident: str
) -> None:
    with pytest.raises(LookupError):
        report_site.resolve(settings, ["churn"], use_case, kind, ident)


def test_the_app_serves_reports_and_refuses_traversal(settings: Settings) -> None:
    app = report_app.create_app(lambda: settings, lambda: [SimpleNamespace(name="churn")])
    client = TestClient(app)
    night = client.get("/churn/nightly/2024-11-20")
    assert night.status_code == 200 and "night of 2024-11-20" in night.text
    assert night.headers["content-type"].startswith("text/html")
    assert client.get("/churn/evaluation/churn-20241120-abcdef12").status_code == 200
    assert client.get("/churn/nightly/2024-11-21").status_code == 404
    attempt = client.get("/churn/nightly/2024-11-20-attempt-2")
    assert attempt.status_code == 200 and "attempt 2" in attempt.text
    for raw in (
        "/churn/nightly/..%2fsecret.html",
        "/churn/nightly/%2e%2e%2f%2e%2e%2foutside",
        "/churn/evaluation/..%2F..%2Foutside",
        "/churn/%2e%2e/secret.html",
    ):
        r = client.get(raw)
        assert r.status_code == 404 and "outside" not in r.text and "not a report" not in r.text


class Denied:
    async def user(self, request: object) -> str:
        return "viewer"

    def may_read(self, user: object, use_case: str) -> bool:
        return False


def test_a_user_without_dag_access_is_refused(settings: Settings) -> None:
    app = report_app.create_app(lambda: settings, lambda: [SimpleNamespace(name="churn")], Denied())
    assert TestClient(app).get("/churn/nightly/2024-11-20").status_code == 403
