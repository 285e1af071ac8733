"""A browser (Playwright driving the system Chromium) against a real Airflow serving these
DAGs on a warehouse whose data ends yesterday, as after ``make demo``.

Screenshots and each flow's time go to ``$NIGHTSCORE_TEST_ARTIFACTS`` (default
``.nightscore/test-artifacts/ui``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.core.paths import REPO_ROOT
from pipeline.store import serving
from pipeline.synthetic import warehouse
from pipeline.synthetic.world import World
from tests.conftest import create_database, drop_database
from tests.dags.services import Timings, airflow_services, free_port, own_metadata, service_env

CHROMIUM = os.environ.get("NIGHTSCORE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("NIGHTSCORE_TEST_ARTIFACTS", REPO_ROOT / ".nightscore" / "test-artifacts" / "ui")
)
WORLD_DAYS = 330  # the world ends yesterday, like the demo's
CUSTOMERS = 3000


@pytest.fixture(scope="module")
def world(server_url: str, session_id: str) -> Iterator[Settings]:
    """Serving objects and a small warehouse whose last day is yesterday."""
    name = f"nightscore_test_{session_id}_ui"
    url = create_database(server_url, name)
    serving.init(url, usecase.load_all())
    s = Settings(database_url=url, warehouse_url=url, home=ARTIFACTS.parent / f"home-{session_id}")
    start = date.today() - timedelta(days=WORLD_DAYS)
    warehouse.seed(s, World(CUSTOMERS, start, seed=11), WORLD_DAYS)
    yield s
    drop_database(server_url, name)


@pytest.fixture(scope="module")
def airflow(
    world: Settings,
    airflow_env: dict[str, str],
    server_url: str,
    session_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """API server (with the reports plugin), scheduler and triggerer (approvals defer to it),
    on a metadata database of their own: a new user's Airflow, where no other test's runs
    (e.g. a night waiting for its data) hold the DAG's one active run."""
    logs = tmp_path_factory.mktemp("ui")
    env = service_env(airflow_env, world, free_port(), logs)
    with (
        own_metadata(env, server_url, f"nightscore_airflow_{session_id}_ui") as env,
        airflow_services(env, logs, "scheduler", "triggerer") as svc,
    ):
        password = json.loads((logs / "passwords.json").read_text())["admin"]
        yield svc | {"env": env, "logs": logs, "password": password}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS.glob("FAILED-*"):  # a failure screenshot belongs to its own session
        stale.unlink()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser: Any, airflow: dict[str, Any]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=airflow["base"])
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def timings() -> Timings:
    """Each flow's seconds, kept beside the screenshots."""
    return Timings(ARTIFACTS / "timings.json")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed flow leaves a screenshot and the page's HTML beside the others."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    page = getattr(item, "funcargs", {}).get("page")
    if report.when == "call" and report.failed and page is not None:
        try:
            page.screenshot(path=str(ARTIFACTS / f"FAILED-{item.name}.png"), full_page=True)
            (ARTIFACTS / f"FAILED-{item.name}.html").write_text(page.content())
        except Exception as exc:  # the browser may be the thing that failed
            print(f"no failure screenshot: {exc}")
