"""Does a stale model decay on the synthetic warehouse, and does retraining recover?

    .venv/bin/python benchmarks/decay.py [--customers 20000] [--days 456]

Trains one model before the drift events (price rise on day 240, launch on day 300)
and keeps it frozen; for each later snapshot date S it prints the frozen model's AUC on
S's matured labels next to a model retrained at S + 30 (whose out-of-time holdout is S).
Runs in a throw-away database on the configured (or embedded) server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date, timedelta
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=456)
    ap.add_argument("--frozen-day", type=int, default=225)
    ap.add_argument("--step", type=int, default=30)
    args = ap.parse_args()

    from _common import fresh_database

    from pipeline.conf import usecase
    from pipeline.conf.config import Settings
    from pipeline.stages import evaluate, features, train
    from pipeline.synthetic import warehouse
    from pipeline.synthetic.world import World

    start = date(2024, 1, 1)
    uc = usecase.load("churn")
    with fresh_database() as url:
        settings = Settings(database_url=url, warehouse_url=url, home=Path(tempfile.mkdtemp()))
        warehouse.seed(settings, World(args.customers, start, seed=7), args.days)
        end = start + timedelta(days=args.days)
        frozen = train.train_challenger(settings, uc, start + timedelta(days=args.frozen_day))
        model, _ = _load(frozen.artifact_uri)
        cols = [f["name"] for f in frozen.card["features"]]
        print(
            f"frozen model trained as of day {args.frozen_day} ({start + timedelta(days=args.frozen_day)}), "
            f"its own holdout AUC {frozen.metrics['roc_auc']:.3f}"
        )
        print(
            f"{'snapshot':>10} {'day':>4} {'frozen AUC':>10} {'retrained AUC':>13} {'frozen lift':>11} {'retrained lift':>14}"
        )
        day = args.frozen_day
        while start + timedelta(days=day + 30) <= end:
            s = start + timedelta(days=day)
            snap = features.build_snapshot(
                settings, uc, s, labelled=True, known_through=s + timedelta(days=30)
            )
            table = features.read_snapshot(snap)
            y = table.column("label").to_numpy()
            p = train.predict(model, table, cols)
            fresh = train.train_challenger(settings, uc, s + timedelta(days=30))
            print(
                f"{s!s:>10} {day:>4} {evaluate.roc_auc(y, p):>10.3f} {fresh.metrics['roc_auc']:>13.3f} "
                f"{evaluate.lift(y, p):>11.2f} {fresh.metrics['lift_top_decile']:>14.2f}",
                flush=True,
            )
            day += args.step
    return 0


def _load(path: str):
    import pickle

    with open(path, "rb") as fh:  # an artifact this script wrote a moment ago
        return pickle.load(fh), None


if __name__ == "__main__":
    sys.exit(main())
