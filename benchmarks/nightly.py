"""A night at scale: seconds and peak RSS per stage, for a night with retrain and one without.

    .venv/bin/python benchmarks/nightly.py --customers 100000 [--days 230] [--keep]
        [--training-study] [--no-later-retrain]

Seeds a warehouse of N customers (``--days`` of history) in a fresh database on the
configured (or embedded) server, then runs three nights through the stage functions the
DAG calls (``pipeline.run.nightly.run_night``): the first with retrain from an empty snapshot
store (every training snapshot built), the next with retrain as every later night (the
earlier snapshots reused, only newly matured ones built), the third without retrain. For
each stage it prints seconds and the process's peak RSS within the stage (the kernel's
high-water mark is reset before each stage), and for scoring and publishing rows per
second. Threads follow the CPU allowance (``OMP_NUM_THREADS`` caps it).
``--training-study`` fits the second night's training data whole and capped
(``training.max_rows``, or a quarter of the rows), each with all trees and with early
stopping, and prints fit seconds, trees and holdout AUC.

The naive baseline runs in the same process on the same night: ``pandas.read_sql`` of the
feature query, ``predict_proba`` on the DataFrame, ``DataFrame.to_sql`` into a scratch
table; printed beside features + score + publish as a ratio. Publishing is held to a binary
COPY of the same night's rows into a new table followed by the same primary key, timed in
the serving database after the third night.

Then each target (set for 1M active customers on 2 cores) with what was measured and PASS
or MISS, and a last line:
``night: <s> s without retrain, <s> s with; <x>x naive; score <k> rows/s; publish <x>x copy+key``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
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
    """Times each stage of a night and keeps its peak RSS (``run_night``'s ``call`` hook)."""

    RATED = ("score_partitions", "publish_scores")  # stages shown with rows per second

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.population = 0
        self.read_from: dict[str, str] = {}  # check_sources: the first day read per table

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        reset_peak_rss()
        began = time.monotonic()
        out = fn(*args)
        self.rows.append((fn.__name__, time.monotonic() - began, peak_rss_mb()))
        if fn.__name__ == "build_features":
            self.population = int(out["rows"])
        if fn.__name__ == "check_sources":
            self.read_from = dict(out.get("read_from", {}))
        return out

    def seconds(self, *names: str) -> float:
        return sum(r[1] for r in self.rows if r[0] in names)

    def print(self, title: str) -> float:
        total = sum(r[1] for r in self.rows)
        print(f"\n{title}: {total:.1f} s, peak RSS {max(r[2] for r in self.rows):,.0f} MiB")
        print(f"  {'stage':<22} {'seconds':>8} {'peak RSS MiB':>13}")
        for name, seconds, rss in self.rows:
            rate = f"  {self.population / seconds:,.0f} rows/s" if name in self.RATED else ""
            print(f"  {name:<22} {seconds:>8.2f} {rss:>13,.0f}{rate}")
        if self.read_from:
            firsts = ", ".join(f"{t} {d}" for t, d in sorted(self.read_from.items()))
            print(f"  check_sources read from: {firsts}")
        return total


def night(settings: Any, uc: Any, day: date, retrain: str) -> Stages:
    """One night through ``run_night``: the DAG's stage functions in the DAG's order."""
    from pipeline.run import nightly

    stages = Stages()
    nightly.run_night(
        settings, uc, day, retrain=retrain, run_id=f"bench__{retrain}__{day}", call=stages
    )
    return stages


def training_study(settings: Any, uc: Any, day: date) -> None:
    """Holdout AUC and fit seconds of the night's training data: whole, capped, early stopped."""
    from pipeline.stages import evaluate, features, train

    whole = train.training_data(settings, uc.evolve({"training": {"max_rows": None}}), day)
    hold = features.read_snapshot(whole.holdout)
    y_hold = hold.column("label").to_numpy()
    cat, num = train.split_columns(whole.table.schema, uc)
    print(f"\ntraining study ({whole.table.num_rows:,} rows, holdout {hold.num_rows:,}):")
    print(
        f"  {'variant':<44} {'rows':>10} {'fit s':>7} {'AUC':>7} {'trees':>6} {'score rows/s':>13}"
    )
    cap = uc.training.max_rows or whole.table.num_rows // 4
    rate = float(uc.model.params.get("learning_rate", 0.1))

    def variant(max_rows: int | None, early_stopping: bool, learning_rate: float = rate) -> Any:
        return uc.evolve(
            {
                "training": {"max_rows": max_rows},
                "model": {
                    "params": {"early_stopping": early_stopping, "learning_rate": learning_rate}
                },
            }
        )

    variants = [
        ("every row, all trees", variant(None, False)),
        ("every row, early stopping", variant(None, True)),
        (f"max_rows {cap:,}, all trees", variant(cap, False)),
        (f"max_rows {cap:,}, early stopping", variant(cap, True)),
        (f"max_rows {cap:,}, early stopping, rate x2", variant(cap, True, 2 * rate)),
    ]
    for name, spec in variants:
        data = whole if spec.training.max_rows is None else train.training_data(settings, spec, day)
        began = time.monotonic()
        model = train.fit(spec, data.table, cat + num, data.labels, data.weights)
        seconds = time.monotonic() - began
        began = time.monotonic()
        with train.threads():  # scoring speed is the trees': the holdout scored at once
            p = train.predict(model, hold, cat + num)
        rows_per_second = hold.num_rows / (time.monotonic() - began)
        auc = evaluate.classification_metrics(y_hold, p)["roc_auc"]
        iters = getattr(model[-1], "n_iter_", "")
        print(
            f"  {name:<44} {data.table.num_rows:>10,} {seconds:>7.1f} {auc:>7.4f} {iters:>6} "
            f"{rows_per_second:>13,.0f}"
        )


def naive(settings: Any, uc: Any, day: date, version: str) -> tuple[float, int]:
    """read_sql of the feature query, predict_proba on the DataFrame, to_sql: seconds, rows."""
    import pandas as pd
    import sqlalchemy

    from pipeline.conf.urls import sqlalchemy_url
    from pipeline.stages import features
    from pipeline.store import registry

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
    ap.add_argument("--keep", action="store_true", help="keep the warehouse for the next run")
    ap.add_argument(
        "--seed-only", action="store_true", help="seed (and keep) the warehouse, no night"
    )
    ap.add_argument(
        "--training-study", action="store_true", help="also fit whole, capped and early stopped"
    )
    ap.add_argument(
        "--no-later-retrain",
        action="store_true",
        help="skip the second night (a later night with retrain): large populations, less time",
    )
    args = ap.parse_args()

    from _common import FIRST_DAY, fresh_database, warehouse_database

    from pipeline.conf import usecase
    from pipeline.conf.config import load_settings
    from pipeline.stages import train
    from pipeline.store import registry

    uc = usecase.load(args.use_case)
    night_1 = FIRST_DAY + timedelta(days=args.days)
    print(f"CPU allowance: {train.cpu_allowance()} threads")
    with (
        warehouse_database(
            args.customers, args.days + 2, args.seed, args.keep or args.seed_only
        ) as wh,
        fresh_database() as url,
        tempfile.TemporaryDirectory(prefix="nightscore-bench-") as home,
    ):
        settings = replace(load_settings(), database_url=url, warehouse_url=wh, home=Path(home))
        if args.seed_only:
            return 0
        cold = night(settings, uc, night_1, "always")
        cold.print(
            f"night {night_1} with retrain, every training snapshot built, {cold.population:,} rows"
        )
        night_2 = night_1 + timedelta(days=1)
        warm = Stages()
        if not args.no_later_retrain:
            warm = night(settings, uc, night_2, "always")
            warm.print(f"night {night_2} with retrain, earlier nights' snapshots reused")
        night_3 = night_2 + timedelta(days=1)
        without = night(settings, uc, night_3, "never")
        total = without.print(f"night {night_3} without retrain")
        ours = without.seconds("build_features", "score_partitions", "publish_scores")
        champion = registry.champion(settings, uc.name)
        assert champion is not None
        naive_seconds, naive_rows = naive(settings, uc, night_3, champion.version)
        print(
            f"\nfeatures + score + publish: {ours:.1f} s; naive read_sql + predict + to_sql: "
            f"{naive_seconds:.1f} s for {naive_rows:,} rows; {naive_seconds / ours:.2f}x "
            f"(a night without retrain in all: {total:.1f} s)"
        )
        baseline = copy_and_key(settings, uc, night_3)
        publish_seconds = without.seconds("publish_scores")
        print(
            f"publish_scores: {publish_seconds:.2f} s; a binary COPY of the same rows and "
            f"its primary key: {baseline:.2f} s"
        )
        peak = max(r[2] for n in (cold, warm, without) for r in n.rows) / 1024
        score_rate = without.population / without.seconds("score_partitions")
        verdicts = Targets()
        verdicts.add("night without retrain", total, "s", 25, at_most=True)
        later = sum(r[1] for r in warm.rows) if warm.rows else None
        verdicts.add("later night with retrain", later, "s", 120, at_most=True)
        verdicts.add("features + score + publish vs naive", naive_seconds / ours, "x", 3, False)
        verdicts.add("peak RSS of a night", peak, "GiB", 2, at_most=True)
        verdicts.add("score", score_rate / 1000, "k rows/s", 400, at_most=False)
        verdicts.add("publish vs COPY + key", baseline / publish_seconds, "x", 0.9, False)
        verdicts.print(without.population)
        if args.training_study:
            training_study(settings, uc, night_2)
        print(
            f"night: {total:.1f} s without retrain, "
            f"{'not run' if later is None else f'{later:.1f}'} s with; "
            f"{naive_seconds / ours:.2f}x naive; score {score_rate / 1000:.0f}k rows/s; "
            f"publish {baseline / publish_seconds:.2f}x copy+key"
        )
    return 0


class Targets:
    """The issue's targets, each with what was measured and PASS or MISS."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None, str, float, bool]] = []

    def add(self, name: str, value: float | None, unit: str, target: float, at_most: bool) -> None:
        """One target; ``value`` None: not measured in this run."""
        self.rows.append((name, value, unit, target, at_most))

    def print(self, population: int) -> None:
        print(f"\ntargets (set for 1M active customers on 2 cores; {population:,} scored here):")
        for name, value, unit, target, at_most in self.rows:
            bound = f"{'<=' if at_most else '>='} {target:g} {unit}"
            if value is None:
                print(f"  {name:<38} {'not run':>9} {unit:<9} {bound:<16}")
                continue
            ok = value <= target if at_most else value >= target
            print(f"  {name:<38} {value:>9.2f} {unit:<9} {bound:<16} {'PASS' if ok else 'MISS'}")


def copy_and_key(settings: Any, uc: Any, day: date) -> float:
    """Seconds to COPY the night's published rows (binary, ADBC) into a new table and build
    the same primary key, in the serving database: the ceiling publishing is held to."""
    from pipeline.store import db

    table = db.read_arrow(
        settings.database_url,
        f"SELECT * FROM predictions.{uc.score_table} WHERE score_date = :day",
        {"day": day},
    )
    db.scalar(
        settings.database_url,
        "DROP TABLE IF EXISTS public.bench_copy_key; CREATE TABLE public.bench_copy_key AS "
        f"SELECT * FROM predictions.{uc.score_table} WHERE false; CHECKPOINT; SELECT 1",
    )
    began = time.monotonic()
    db.ingest(settings.database_url, "bench_copy_key", table, "public")
    db.scalar(
        settings.database_url,
        "SET maintenance_work_mem = '256MB'; ALTER TABLE public.bench_copy_key "
        f"ADD PRIMARY KEY (score_date, {uc.entity_key}); SELECT 1",
    )
    seconds = time.monotonic() - began
    db.scalar(settings.database_url, "DROP TABLE public.bench_copy_key; SELECT 1")
    return seconds


if __name__ == "__main__":
    sys.exit(main())
