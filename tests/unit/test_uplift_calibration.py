"""``benchmarks/uplift_calibration.py`` on two small worlds: it runs, its truth is exactly 0
when emails do nothing, it prints its last line as documented, and it is seeded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "uplift_calibration.py"
ARGS = ["--worlds", "2", "--customers", "4000", "--jobs", "1"]
# a row of the summary: emails, estimator; coverage, bias, rmse, estimate, truth, ...
ROW = re.compile(r"\s+emails(' real effect| without effect)\s+(all|first) contacts\s+(.*)")
LAST = re.compile(r"uplift: coverage \d+\.\d%; bias [+-]\d+\.\d\d pp; rmse \d+\.\d\d pp")
TIMED = re.compile(r"^\(\d+ s")


def _run() -> list[str]:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *ARGS],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_the_benchmark_compares_estimates_with_the_truth_and_is_seeded() -> None:
    lines = _run()
    assert LAST.fullmatch(lines[-1]), lines[-1]
    assert lines[-2].startswith("all contacts: coverage ")
    rows = {
        ("real" if m[1].startswith("'") else "zero", m[2]): m[3].split()
        for m in map(ROW.fullmatch, lines)
        if m is not None
    }
    assert sorted(rows) == [(e, k) for e in ("real", "zero") for k in ("all", "first")]
    # emails that do nothing: the simulator's truth is 0 for either estimator
    assert [rows["zero", k][4] for k in ("all", "first")] == ["+0.00", "+0.00"], rows
    # the real effect: emails prevent cancellations (a positive truth)
    assert all(float(rows["real", k][4]) > 0 for k in ("all", "first")), rows
    # the times aside, the same arguments print the same figures
    assert [x for x in _run() if not TIMED.match(x)] == [x for x in lines if not TIMED.match(x)]
