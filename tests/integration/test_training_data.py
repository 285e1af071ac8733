"""Training snapshots on a calendar grid are built once and reused; the row cap samples and
weights by class."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.stages import features, train
from tests.conftest import SCORE_DATE

UC = usecase.load("churn").evolve({"training": {"snapshots": 3, "step_days": 7}})


def at(seeded: Settings, home: Path) -> Settings:
    return replace(seeded, home=home)


def test_the_next_night_reuses_every_training_snapshot_but_the_newly_matured(
    seeded: Settings, tmp_path: Path
) -> None:
    s = at(seeded, tmp_path / "nights")
    tonight = train.training_data(s, UC, SCORE_DATE)
    assert tonight.reused == 0
    shas = {snap.as_of: snap.sha256 for snap in tonight.snapshots}
    nights = [train.training_data(s, UC, SCORE_DATE + timedelta(days=d)) for d in range(1, 8)]
    for d, night in enumerate(nights, 1):
        dates = [snap.as_of for snap in night.snapshots]
        new = set(dates) - set(shas)
        # at most one grid date matures a night; the holdout moves with the run date
        assert len(new) <= 1 and night.reused == len(dates) - len(new), (d, new)
        shas |= {snap.as_of: snap.sha256 for snap in night.snapshots}
    # a week on, the 7-day grid moved by one date: one snapshot was built for it
    assert {snap.as_of for snap in nights[-1].snapshots} != set(
        snap.as_of for snap in tonight.snapshots
    )
    # a whole rebuild from the facts, in an empty home, gives the same bytes
    rebuilt = train.training_data(at(seeded, tmp_path / "rebuilt"), UC, SCORE_DATE + timedelta(7))
    assert rebuilt.reused == 0
    assert [x.sha256 for x in rebuilt.snapshots] == [x.sha256 for x in nights[-1].snapshots]
    assert rebuilt.holdout.sha256 == nights[-1].holdout.sha256


def test_a_changed_feature_query_builds_its_own_snapshots(seeded: Settings, tmp_path: Path) -> None:
    s = at(seeded, tmp_path)
    first = train.training_data(s, UC, SCORE_DATE)
    changed_sql = tmp_path / "features.sql"
    changed_sql.write_text(
        UC.sql.features.read_text().replace("/ 7.0 AS minutes_7d", "/ 7.5 AS minutes_7d")
    )
    changed = UC.model_copy(update={"sql": UC.sql.model_copy(update={"features": changed_sql})})
    second = train.training_data(s, changed, SCORE_DATE)
    assert second.reused == 0
    assert {x.path.parent for x in second.snapshots}.isdisjoint(
        {x.path.parent for x in first.snapshots}
    )
    # and a snapshot whose bytes no longer match its name is rebuilt, not trusted
    victim = first.snapshots[0].path
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    again = train.training_data(s, UC, SCORE_DATE)
    assert again.reused == len(first.snapshots)  # the holdout and two intact ones
    assert again.snapshots[0].sha256 == first.snapshots[0].sha256
    features.verify(again.snapshots[0])


def test_the_row_cap_keeps_every_positive_and_weights_the_sampled_negatives(
    seeded: Settings, tmp_path: Path
) -> None:
    s = at(seeded, tmp_path)
    whole = train.training_data(s, UC, SCORE_DATE)
    cap = whole.table.num_rows // 3
    capped_uc = UC.evolve({"training": {"max_rows": cap}})
    capped = train.training_data(s, capped_uc, SCORE_DATE)
    assert capped.rows_before_cap == whole.table.num_rows
    positives = int(whole.labels.sum())
    assert int(capped.labels.sum()) == positives
    assert capped.weights is not None
    assert np.all(capped.weights[capped.labels == 1] == 1.0)
    assert abs(capped.table.num_rows - cap) < 0.05 * cap
    # the weights stand for every row of each class
    negatives = whole.table.num_rows - positives
    assert capped.weights[capped.labels == 0].sum() == pytest.approx(negatives, rel=0.05)
    # the same data and seed draw the same sample
    again = train.training_data(s, capped_uc, SCORE_DATE)
    assert again.table.equals(capped.table)
    # the drift reference is a sample at one rate: its positive share is the data's
    uniform = capped.reference_table().column("label").to_numpy()
    assert uniform.mean() == pytest.approx(positives / whole.table.num_rows, abs=0.03)
    # a model fits on the weighted sample and ranks the holdout
    cat, num = train.split_columns(capped.table.schema, UC)
    model = train.fit(capped_uc, capped.table, cat + num, capped.labels, capped.weights)
    hold = features.read_snapshot(capped.holdout)
    p = train.predict(model, hold, cat + num)
    assert 0 < p.min() < p.max() < 1


def test_pooled_holdout_dates_are_out_of_time_and_reused(seeded: Settings, tmp_path: Path) -> None:
    s = at(seeded, tmp_path)
    pooled_uc = UC.evolve({"training": {"holdout_snapshots": 3}})
    data = train.training_data(s, pooled_uc, SCORE_DATE)
    held = [h.as_of for h in data.holdouts]
    assert len(held) == 3 and held[-1] == SCORE_DATE - timedelta(days=UC.label.horizon_days)
    # every training label closes by the oldest holdout date
    assert all(features.label_end(UC, t.as_of) <= held[0] for t in data.snapshots)
    # the older holdout dates are grid dates: a later night builds none of them again
    tomorrow = train.training_data(s, pooled_uc, SCORE_DATE + timedelta(days=1))
    assert [h.sha256 for h in tomorrow.holdouts[:-1]] == [h.sha256 for h in data.holdouts[:-1]]
    # stacked, each row says which date it is from
    table = features.read_pooled(data.holdouts)
    assert table.num_rows == sum(h.rows for h in data.holdouts)
    assert sorted(set(table.column(features.HOLDOUT_DATE).to_pylist())) == held
