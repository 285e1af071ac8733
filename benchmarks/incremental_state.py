"""Windows kept night to night vs recomputed from the facts (README "Windows kept night to night").

    .venv/bin/python benchmarks/incremental_state.py --customers 1000000 [--keep]

On the churn warehouse of N customers (seeded, or reused from an earlier ``--keep`` run of
this or ``benchmarks/nightly.py``), tonight's scoring snapshot (as of D) three ways, each
through ``features.build_snapshot``:

- kept: the windows of the night before (as of D-1, built first, untimed) rolled one day
  forward: one state row per customer and a few days of facts; the blocks rolled at once,
  then again one after the other;
- rebuilt: an empty state store, so the windows come from 60 days of facts (and are kept);
- inline: the features query with the windows as CTEs over the facts, as a pipeline
  without kept state runs it (nothing kept, read whole).

The snapshots of the first two must be the same bytes; the inline read must hold the same
values. Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=230, help="days of history before the night")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the warehouse for the next run")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    from _common import FIRST_DAY, warehouse_database

    from pipeline.conf import usecase
    from pipeline.conf.config import load_settings
    from pipeline.stages import features, windows
    from pipeline.store import db

    logging.basicConfig(level=logging.WARNING)
    uc = usecase.load("churn")
    day = FIRST_DAY + timedelta(days=args.days + 2)  # benchmarks/nightly.py's third night
    workers = windows.WORKERS
    with (
        warehouse_database(args.customers, args.days + 2, args.seed, args.keep) as wh,
        tempfile.TemporaryDirectory(prefix="nightscore_windows_") as home,
    ):
        base = replace(load_settings(), warehouse_url=wh, warehouse_schema="warehouse")
        kept_home = replace(base, home=Path(home) / "kept")
        features.build_snapshot(kept_home, uc, day - timedelta(days=1))

        began = time.monotonic()
        kept = features.build_snapshot(kept_home, uc, day)
        kept_s = time.monotonic() - began

        # the same roll with the blocks one after the other (tonight's kept states removed)
        for tonight in (kept_home.snapshots / uc.name / "windows").glob(f"*/*/as_of={day}"):
            shutil.rmtree(tonight)
        windows.WORKERS = 1
        began = time.monotonic()
        one_by_one = features.build_snapshot(kept_home, uc, day)
        one_by_one_s = time.monotonic() - began
        windows.WORKERS = workers

        began = time.monotonic()
        rebuilt = features.build_snapshot(replace(base, home=Path(home) / "rebuilt"), uc, day)
        rebuilt_s = time.monotonic() - began

        began = time.monotonic()
        inline = db.read_arrow(
            wh, features.query(uc, "features"), {"as_of": day}, schema="warehouse"
        )
        inline_s = time.monotonic() - began
        same_values = inline.cast(pq.read_schema(kept.path)).equals(pq.read_table(kept.path))
    same = kept.sha256 == rebuilt.sha256 == one_by_one.sha256
    print(f"tonight's churn snapshot as of {day}, {kept.rows:,} customers:")
    print(f"  windows kept, rolled one day       {kept_s:7.2f} s   ({workers} blocks at once)")
    print(
        f"  the same, one block at a time      {one_by_one_s:7.2f} s   {one_by_one_s / kept_s:.2f}x"
    )
    print(f"  windows rebuilt from the facts     {rebuilt_s:7.2f} s   {rebuilt_s / kept_s:.2f}x")
    print(f"  inline CTEs, nothing kept          {inline_s:7.2f} s   {inline_s / kept_s:.2f}x")
    print(
        f"  same snapshot bytes (kept, one at a time, rebuilt): {same}; "
        f"same values (inline): {same_values}"
    )
    return 0 if same and same_values else 1


if __name__ == "__main__":
    sys.exit(main())
