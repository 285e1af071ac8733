"""A night at scale: seconds and peak RSS per stage, for a night with retrain and one without.

    .venv/bin/python benchmarks/nightly.py --customers 100000 [--days 230] [--keep]

Seeds a warehouse of N customers (``--days`` of history ending the day before the night) in
a fresh database on the configured (or embedded) server, then runs two nights through the
stage functions the DAG calls (``pipeline.nightly``): the first with retrain, the next
without. For each stage it prints seconds and the process's peak RSS within the stage (the
kernel's high-water mark is reset before each stage), and for scoring and publishing rows
per second.

The naive baseline runs in the same process on the same night: ``pandas.read_sql`` of the
feature query, ``predict_proba`` on the DataFrame, ``DataFrame.to_sql`` into a scratch
table; printed beside features + score + publish as a ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """The process's peak resident set since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process (Linux: clear_refs 5)."""
    with suppress(OSError):  # the figure then reads as the process's peak so far
        Path("/proc/self/clear_refs").write_text("5")


class Stages:
    """Times each stage and keeps its peak RSS."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str]] = []

    @contextmanager
    def stage(self, name: str, note: Callable[[float], str] | None = None) -> Iterator[None]:
        reset_peak_rss()
        began = time.monotonic()
        yield
        seconds = time.monotonic() - began
        self.rows.append((name, seconds, peak_rss_mb(), note(seconds) if note else ""))

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        with self.stage(name):
            return fn(*args)

    def print(self, title: str) -> float:
        total = sum(r[1] for r in self.rows)
        print(f"\n{title}: {total:.1f} s, peak RSS {max(r[2] for r in self.rows):,.0f} MiB")
        print(f"  {'stage':<22} {'seconds':>8} {'peak RSS MiB':>13}")
        for name, seconds, rss, note in self.rows:
            print(f"  {name:<22} {seconds:>8.2f} {rss:>13,.0f}  {note}")
        return total


def night(settings: Any, uc: Any, day: date, retrain: str) -> tuple[Stages, int]:
    """One night through the DAG's stage functions, in the DAG's order."""
    from pipeline import ledger, nightly

    s = Stages()
    run = ledger.RunContext(uc.name, day, f"bench__{retrain}__{day}")
    params = {"retrain": retrain, "promotion_mode": "auto", "rescore_model": ""}
    started = s.call("start_run", nightly.start_run, settings, uc, run, params)
    s.call("check_sources", nightly.check_sources, settings, uc, run)
    snap = s.call("build_features", nightly.build_features, settings, uc, run)
    s.call("check_features", nightly.check_features, settings, uc, run, snap)
    if s.call("decide_retrain", nightly.decide_retrain, settings, uc, run, retrain)["retrain"]:
        trained = s.call("train_challenger", nightly.train_challenger, settings, uc, run)
        s.call(
            "evaluate_challenger",
            nightly.evaluate_challenger,
            settings,
            uc,
            run,
            trained,
            "auto",
            snap,
        )
    chosen = s.call(
        "select_model", nightly.select_model, settings, uc, run, None, started["champion_at_start"]
    )
    version = chosen["model_version"]
    rows = int(snap["rows"])
    parts: list[dict[str, Any]] = []
    with s.stage("score", lambda t: f"{rows / t:,.0f} rows/s"):
        for p in range(uc.serving.partitions):
            parts.append(nightly.score_partition(settings, uc, run, snap, version, p))
    s.call("check_scores", nightly.check_scores, settings, uc, run, parts)
    with s.stage("publish_scores", lambda t: f"{rows / t:,.0f} rows/s"):
        nightly.publish_scores(settings, uc, run, snap, version, parts)
    s.call("score_shadow", nightly.score_shadow, settings, uc, run, snap, version, parts)
    s.call("write_report", nightly.write_report, settings, uc, run)
    return s, rows


def naive(settings: Any, uc: Any, day: date, version: str) -> tuple[float, int]:
    """read_sql of the feature query, predict_proba on the DataFrame, to_sql: seconds, rows."""
    import pandas as pd
    import sqlalchemy

    from pipeline import features, registry
    from pipeline.config import sqlalchemy_url

    model, mv = registry.load_model(settings, uc.name, version)
    columns = [f["name"] for f in mv.feature_schema]
    engine = sqlalchemy.create_engine(
        sqlalchemy_url(settings.warehouse_url),
        connect_args={"options": f"-c search_path={settings.warehouse_schema},public"},
    )
    began = time.monotonic()
    with engine.connect() as conn:
        frame = pd.read_sql(
            sqlalchemy.text(features.query(uc, "features")), conn, params={"as_of": day}
        )
    p = model.predict_proba(frame[columns])[:, 1]
    out = pd.DataFrame({uc.entity_key: frame[uc.entity_key], uc.probability_column: p})
    out.to_sql("bench_naive_scores", engine, schema="public", if_exists="replace", index=False)
    seconds = time.monotonic() - began
    engine.dispose()
    return seconds, len(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=230, help="days of history before the night")
    ap.add_argument("--use-case", default="churn")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # see the README: OpenMP on a shared box

    from _common import fresh_database

    from pipeline import usecase, warehouse
    from pipeline.config import load_settings

    uc = usecase.load(args.use_case)
    first = date.today() - timedelta(days=args.days + 1)
    night_1 = first + timedelta(days=args.days - 1)
    with fresh_database() as url, tempfile.TemporaryDirectory(prefix="nightscore-bench-") as home:
        settings = replace(load_settings(), database_url=url, warehouse_url=url, home=Path(home))
        began = time.monotonic()
        seeded = warehouse.seed(settings, args.customers, first, args.days + 1, seed=args.seed)
        print(
            f"seeded {args.customers:,} customers x {args.days + 1} days in "
            f"{time.monotonic() - began:.0f} s ({sum(seeded.rows.values()):,} rows)"
        )
        with_retrain, rows = night(settings, uc, night_1, "always")
        with_retrain.print(f"night {night_1} with retrain, {rows:,} rows")
        without, rows = night(settings, uc, night_1 + timedelta(days=1), "never")
        total = without.print(f"night {night_1 + timedelta(days=1)} without retrain, {rows:,} rows")
        ours = sum(
            r[1] for r in without.rows if r[0] in ("build_features", "score", "publish_scores")
        )
        from pipeline import registry

        champion = registry.champion(settings, uc.name)
        assert champion is not None
        naive_seconds, naive_rows = naive(
            settings, uc, night_1 + timedelta(days=1), champion.version
        )
        print(
            f"\nfeatures + score + publish: {ours:.1f} s; naive read_sql + predict + to_sql: "
            f"{naive_seconds:.1f} s for {naive_rows:,} rows; {naive_seconds / ours:.2f}x "
            f"(a night without retrain in all: {total:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
