"""The command-line progress reporter: plain lines off a terminal, failures, bar throttling."""

from __future__ import annotations

import io
import re

import pytest

from pipeline.core import progress
from pipeline.synthetic.demo import ended_stages


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    encoding = "utf-8"


def plain(clock: Clock, **kw: float) -> tuple[progress.Reporter, Stream]:
    out = Stream()
    return progress.Reporter(out, interactive=False, clock=clock, **kw), out


def test_off_a_terminal_each_stage_is_a_start_line_and_an_end_line_with_its_time() -> None:
    clock = Clock()
    reporter, out = plain(clock)
    with progress.reporting(reporter):
        with progress.stage("build_features"):
            clock.now += 12.34
        with progress.stage("train_challenger"):
            clock.now += 125
    assert out.getvalue().splitlines() == [
        "▸ build_features …",
        "✓ build_features  12.3 s",
        "▸ train_challenger …",
        "✓ train_challenger  2 min 05 s",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_failing_stage_ends_with_one_line_of_its_error_and_the_error_propagates() -> None:
    clock = Clock()
    reporter, out = plain(clock)
    with (
        progress.reporting(reporter),
        pytest.raises(ValueError, match="PSI"),
        progress.stage("check_scores"),
    ):
        clock.now += 3.1
        raise ValueError("score PSI 0.41 above the limit 0.25\nsecond line of detail")
    assert out.getvalue().splitlines()[-1] == (
        "✗ check_scores  failed after 3.1 s: score PSI 0.41 above the limit 0.25"
    )


def test_a_stage_marked_failed_without_raising_ends_with_a_failure_line() -> None:
    reporter, out = plain(Clock())
    with progress.reporting(reporter), progress.stage("airflow_db_migrate") as shown:
        shown.fail("see migrate.log")
    assert out.getvalue().splitlines()[-1] == (
        "✗ airflow_db_migrate  failed after 0.0 s: see migrate.log"
    )


def test_nested_stages_and_notes_are_indented_under_their_stage() -> None:
    clock = Clock()
    reporter, out = plain(clock)
    with progress.reporting(reporter), progress.stage("1/8 2024-09-17 churn_nightly"):
        progress.note("first night")
        with progress.stage("advance_warehouse"):
            clock.now += 1
        reporter.finished("start_run", None)
        reporter.finished("build_features", 4.0)
        reporter.finished("check_features", 0.5, "3 keys are null")
    assert out.getvalue().splitlines() == [
        "▸ 1/8 2024-09-17 churn_nightly …",
        "  first night",
        "  ▸ advance_warehouse …",
        "  ✓ advance_warehouse  1.0 s",
        "  ✓ start_run",
        "  ✓ build_features  4.0 s",
        "  ✗ check_features  failed after 0.5 s: 3 keys are null",
        "✓ 1/8 2024-09-17 churn_nightly  1.0 s",
    ]


def test_a_plain_bar_prints_at_most_every_tenth_of_the_work_or_every_five_seconds() -> None:
    clock = Clock()
    reporter, out = plain(clock, grace_seconds=0.0)
    with progress.reporting(reporter), progress.stage("simulate_days", 1000, "days") as days:
        for _ in range(1000):  # 1000 updates, 1 ms apart: ten lines, one per 10 %
            clock.now += 0.001
            days.advance()
    bars = [line for line in out.getvalue().splitlines() if "days" in line and "%" in line]
    assert [re.search(r"(\d+)%", b).group(1) for b in bars] == [  # type: ignore[union-attr]
        str(p) for p in range(10, 101, 10)
    ]
    assert bars[0] == "  simulate_days  100/1,000 days  10%  0.1 s"

    clock = Clock()
    reporter, out = plain(clock, grace_seconds=0.0)
    with progress.reporting(reporter), progress.stage("score_partitions", 1000) as slow:
        for _ in range(30):  # 30 updates of 0.1 %, 1 s apart: only the time rule fires
            clock.now += 1
            slow.advance()
    assert len([line for line in out.getvalue().splitlines() if "%" in line]) == 6


def test_a_quick_stage_shows_no_bar_lines() -> None:
    clock = Clock()
    reporter, out = plain(clock)  # the default grace: no bar line in a stage's first second
    with progress.reporting(reporter), progress.stage("simulate_days", 20, "days") as days:
        for _ in range(20):
            clock.now += 0.01
            days.advance()
    assert out.getvalue().splitlines() == ["▸ simulate_days …", "✓ simulate_days  0.2 s"]


def test_on_a_terminal_the_stage_line_is_redrawn_in_place() -> None:
    clock = Clock()
    out = Stream()
    reporter = progress.Reporter(out, interactive=True, color=False, clock=clock)
    with progress.reporting(reporter), progress.stage("score_partitions", 4, "partitions") as s:
        for _ in range(4):
            clock.now += 1
            s.advance()
    text = out.getvalue()
    assert text.startswith("▸ score_partitions …\r\x1b[K▸ score_partitions  ")
    assert "4/4 partitions" in text
    assert text.endswith("\r\x1b[K✓ score_partitions  4.0 s\n")
    assert text.count("\n") == 1


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert not progress.Reporter(Stream(), interactive=True).color
    monkeypatch.delenv("NO_COLOR")
    assert progress.Reporter(Stream(), interactive=True).color
    assert not progress.Reporter(Stream(), interactive=False).color


def test_a_stream_that_cannot_encode_the_marks_gets_ascii_ones() -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    reporter = progress.Reporter(out, interactive=False, clock=Clock())
    with progress.reporting(reporter), progress.stage("publish_scores"):
        pass
    out.seek(0)
    assert out.read().splitlines() == ["> publish_scores ...", "ok publish_scores  0.0 s"]


def test_without_a_reporter_stages_only_count() -> None:
    assert progress.current() is None
    with progress.stage("score_partitions", 3) as s:
        s.advance(3)
    assert s.done == 3
    progress.note("nowhere")


def test_a_night_run_elsewhere_is_shown_from_its_ledger_row_in_the_night_s_order() -> None:
    shown: set[str] = set()
    row = {
        "select_model": {"status": "ok", "seconds": 0.2},
        "start_run": {"status": "ok"},
        "score_partition_10": {"status": "ok", "seconds": 1.0},
        "score_partition_2": {"status": "ok", "seconds": 1.5},
        "build_features": {"status": "ok", "seconds": 4.25},
    }
    assert ended_stages(row, shown) == [
        ("start_run", None, None),
        ("build_features", 4.25, None),
        ("select_model", 0.2, None),
        ("score_partition_2", 1.5, None),
        ("score_partition_10", 1.0, None),
    ]
    row["check_scores"] = {"status": "failed", "seconds": 0.3, "error": "PSI too high\nmore"}
    assert ended_stages(row, shown) == [("check_scores", 0.3, "PSI too high")]
    assert ended_stages(row, shown) == []
    assert ended_stages(None, shown) == []
