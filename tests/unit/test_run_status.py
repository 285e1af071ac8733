"""What a run without a report says holds it back (pipeline.reports.run_status.why)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.reports.run_status import RunStatus, why

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
BEHIND = "scheduled__2026-12-07T00:00:00+00:00"


def status(**kw: Any) -> RunStatus:
    return RunStatus(dag_id="churn_nightly", run_id="manual__mine", **kw)


def test_a_queued_run_of_a_full_dag_names_the_run_it_waits_behind() -> None:
    lines = why(
        status(state="queued", max_active_runs=1, running=((BEHIND, NOW - timedelta(hours=1)),)),
        now=NOW,
    )
    assert len(lines) == 1
    assert "waits behind" in lines[0] and "scheduled__2026-12-07T00:00:00+00:00" in lines[0]
    assert "running since 2026-12-07 02:00:00 UTC" in lines[0]
    # the link opens that run's own tab: a sibling URL, quoted
    assert 'href="scheduled__2026-12-07T00%3A00%3A00%2B00%3A00"' in lines[0]
    assert "1 run at a time" in lines[0]


def test_a_queued_run_of_a_paused_dag_says_what_unpausing_starts() -> None:
    (line,) = why(status(state="queued", paused="DAG", max_active_runs=1), now=NOW)
    assert "paused" in line and "latest scheduled night" in line
    (other,) = why(status(state="queued", paused="DAG"), nightly=False, now=NOW)
    assert "paused" in other and "night" not in other


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"run_after": NOW + timedelta(hours=2)}, "due at 2026-12-07 05:00:00 UTC"),
        ({"max_active_runs": 1}, "Nothing holds it back"),
        ({"max_active_runs": 2, "running": ((BEHIND, None),)}, "Nothing holds it back"),
        ({"backfill": True, "max_active_runs": 1, "running": ((BEHIND, None),)}, "its backfill"),
    ],
)
def test_a_queued_run(kw: dict, expected: str) -> None:
    assert expected in " ".join(why(status(state="queued", **kw), now=NOW))


def test_a_night_at_wait_for_turn_names_the_holder_of_the_turn() -> None:
    waiting = status(state="running", waiting_at=("wait_for_turn",))
    (line,) = why(waiting, (BEHIND, NOW - timedelta(minutes=5)), now=NOW)
    assert "behind" in line and BEHIND in line and "since 2026-12-07 02:55:00 UTC" in line
    (free,) = why(waiting, None, now=NOW)
    assert "nobody holds the turn" in free
    (own,) = why(waiting, ("manual__mine", NOW), now=NOW)
    assert "nobody holds the turn" in own


def test_waiting_for_data_or_a_person() -> None:
    lines = why(status(state="running", waiting_at=("approve_promotion", "wait_for_data")))
    assert "Required Actions" in lines[0] and "its data" in lines[1]
    assert why(status(state="running")) == []


def test_a_night_that_ended_without_a_report_says_so() -> None:
    (line,) = why(status(state="success"))
    assert "before its night started" in line
    (escaped,) = why(status(state="<b>odd</b>"))
    assert "<b>" not in escaped
