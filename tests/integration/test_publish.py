"""The readers' contract under concurrency: atomic swaps, retries instead of queues, roles, retention."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import numpy as np
import psycopg2
import pytest

from pipeline.conf import usecase
from pipeline.conf.config import Settings
from pipeline.conf.urls import with_role
from pipeline.run import nightly
from pipeline.stages import binary_copy, publish
from pipeline.stages.score import ScoredPart
from pipeline.store import db, ledger
from tests.conftest import SCORE_DATE

UC = usecase.load("churn")


@pytest.fixture(scope="module")
def night(isolated: Settings) -> dict:
    out = nightly.run_night(isolated, UC, SCORE_DATE, retrain="always", run_id="pub-base")
    folder = isolated.scores / "churn" / SCORE_DATE.isoformat() / "pub-base"
    parts = [ScoredPart(i, p, 0) for i, p in enumerate(sorted(folder.glob("part-*.parquet")))]
    return {"version": out["model_version"], "rows": out["published"]["rows"], "parts": parts}


def republish(
    settings: Settings, night: dict, run_id: str, day=SCORE_DATE
) -> publish.PublishResult:
    run = ledger.RunContext("churn", day, run_id)
    ledger.start(settings, run)
    return publish.publish_scores(
        settings, UC, run, night["version"], night["parts"], night["rows"]
    )


def served_hash(settings: Settings, day=SCORE_DATE) -> tuple[int, str]:
    return db.scalar(
        settings.database_url,
        "SELECT json_build_array(count(*), md5(string_agg(customer_id || ':' || churn_probability || ':' "
        "|| risk_decile || ':' || model_version, ',' ORDER BY customer_id))) "
        "FROM predictions.churn_scores WHERE score_date = %s",
        (day,),
    )


def test_three_runs_of_a_date_leave_one_identical_copy(isolated: Settings, night: dict) -> None:
    before = served_hash(isolated)
    for i in range(3):
        republish(isolated, night, f"pub-idem-{i}")
    assert served_hash(isolated) == before
    assert before[0] == night["rows"]
    attempts = db.scalar(
        isolated.database_url,
        "SELECT array_agg(attempt ORDER BY attempt) FROM ml.runs WHERE score_date = %s",
        (SCORE_DATE,),
    )
    assert attempts == list(range(1, len(attempts) + 1))


def test_two_attempts_at_once_give_exactly_one_set_of_rows(isolated: Settings, night: dict) -> None:
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            republish(isolated, night, f"pub-twin-{i}")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    rows, _ = served_hash(isolated)
    assert rows == night["rows"]
    assert (
        db.scalar(
            isolated.database_url,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'predictions' AND tablename LIKE %s",
            ("%\\_stage\\_%",),
        )
        == 0
    )


def test_a_long_reader_makes_the_swap_retry_without_queueing_other_readers(
    isolated: Settings, night: dict
) -> None:
    holder = db.connect(isolated.database_url)
    waits: list[float] = []
    result: dict = {}
    with holder.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM predictions.churn_scores_latest"
        )  # holds its locks until commit

    publisher = threading.Thread(
        target=lambda: result.update(r=republish(isolated, night, "pub-blocked"))
    )
    publisher.start()
    try:
        time.sleep(0.5)
        for _ in range(6):  # other readers keep reading while the publish waits for the long one
            began = time.monotonic()
            assert (
                db.scalar(
                    isolated.database_url, "SELECT count(*) FROM predictions.churn_scores_latest"
                )
                == night["rows"]
            )
            waits.append(time.monotonic() - began)
            time.sleep(0.5)
    finally:
        holder.commit()
        holder.close()
    publisher.join(120)
    assert result["r"].swap_attempts >= 2  # it timed out on the lock and retried
    assert max(waits) < 2.0, (
        waits
    )  # lock_timeout is 1 s: no reader queues longer than that for long
    print(f"\nreaders' worst wait behind a blocked publish: {max(waits):.2f}s")


def read_during(settings: Settings, publishing: Callable[[], None]) -> tuple[list[int], float]:
    """Three readers count the latest night in a loop while ``publishing`` runs: every count
    they saw and the slowest read."""
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []
    worst = [0.0]

    def reader() -> None:
        conn = db.connect(settings.database_url, autocommit=True)
        try:
            while not stop.is_set():
                began = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM predictions.churn_scores_latest")
                    seen.append(cur.fetchone()[0])
                worst[0] = max(worst[0], time.monotonic() - began)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        publishing()
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not errors
    return seen, worst[0]


def test_readers_never_see_a_partial_count_during_publishes(
    isolated: Settings, night: dict
) -> None:
    def publishing() -> None:
        for i in range(3):
            republish(isolated, night, f"pub-busy-{i}")

    seen, worst = read_during(isolated, publishing)
    assert len(seen) > 20 and set(seen) == {night["rows"]}
    print(f"\n{len(seen)} reads during 3 publishes, worst read latency {worst * 1000:.0f} ms")


SERVED = """
SELECT count(*), (SELECT rows FROM ml.publications WHERE use_case = 'churn'
                  ORDER BY score_date DESC LIMIT 1)
FROM predictions.churn_scores_latest
"""


def test_a_new_nights_publish_waits_for_the_reads_in_flight(
    isolated: Settings, night: dict
) -> None:
    """ATTACH PARTITION takes only SHARE UPDATE EXCLUSIVE on the served table: without a
    stronger lock, a read planned before a new night's swap (no partition for it) and run
    after (its publication visible) counts 0 rows of a night published with thousands."""
    holder = db.connect(isolated.database_url)  # a transaction open until commit
    result: dict = {}
    publisher = threading.Thread(
        target=lambda: result.update(
            r=republish(isolated, night, "pub-new-night", SCORE_DATE + timedelta(days=1))
        )
    )
    try:
        with holder.cursor() as cur:
            cur.execute(SERVED)
            before = cur.fetchone()
            publisher.start()
            time.sleep(2.5)  # the swap would commit in milliseconds if nothing held it
            cur.execute(SERVED)  # a new statement: planned and run afresh
            during = cur.fetchone()
    finally:
        holder.commit()
        holder.close()
    publisher.join(120)
    assert before == (night["rows"], night["rows"])
    assert during == before, f"a read while the new night was published saw {during}"
    assert result["r"].swap_attempts >= 2  # the swap waited for the open read, then retried
    after = db.scalar(
        isolated.database_url, f"SELECT json_build_array(c, p) FROM ({SERVED}) AS q(c, p)"
    )
    assert after == [night["rows"], night["rows"]]
    assert db.scalar(
        isolated.database_url, "SELECT DISTINCT score_date FROM predictions.churn_scores_latest"
    ) == SCORE_DATE + timedelta(days=1)


def test_backfilled_old_dates_never_move_latest_backwards(isolated: Settings, night: dict) -> None:
    later = SCORE_DATE + timedelta(days=3)
    republish(isolated, night, "pub-later", later)
    republish(isolated, night, "pub-older", SCORE_DATE - timedelta(days=2))
    assert (
        db.scalar(
            isolated.database_url, "SELECT DISTINCT score_date FROM predictions.churn_scores_latest"
        )
        == later
    )


def test_retention_keeps_the_newest_dates_and_logs_the_drop(
    isolated: Settings, night: dict
) -> None:
    days = [SCORE_DATE + timedelta(days=10 + i) for i in range(3)]
    for i, day in enumerate(days):
        republish(isolated, night, f"pub-ret-{i}", day)
    run = ledger.RunContext("churn", days[-1], "pub-ret-2")
    conn = db.connect(isolated.database_url)
    before = [d for d, _ in publish.published_partitions(conn, UC)]
    conn.close()
    dropped = publish.apply_retention(isolated, UC, run, keep=2)
    assert dropped == before[2:]
    conn = db.connect(isolated.database_url)
    after = [d for d, _ in publish.published_partitions(conn, UC)]
    conn.close()
    assert after == days[::-1][:2]
    logged = db.scalar(
        isolated.database_url, "SELECT count(*) FROM ml.retention_log WHERE run_id = 'pub-ret-2'"
    )
    assert logged == len(dropped)
    assert (
        db.scalar(isolated.database_url, "SELECT count(*) FROM predictions.churn_scores_latest")
        == night["rows"]
    )


def test_the_pipeline_publishes_as_the_writer_role(isolated: Settings, night: dict) -> None:
    writer = replace(isolated, database_url=with_role(isolated.database_url, "nightscore_writer"))
    assert db.scalar(writer.database_url, "SELECT current_user") == "nightscore_writer"
    republish(writer, night, "pub-as-writer", SCORE_DATE + timedelta(days=20))
    owner = db.scalar(
        isolated.database_url,
        "SELECT tableowner FROM pg_tables WHERE tablename = %s",
        (publish.partition_name(UC, SCORE_DATE + timedelta(days=20)),),
    )
    assert owner == "nightscore_writer"


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT count(*) FROM predictions.churn_scores",
        "SELECT count(*) FROM predictions.{partition}",
        "SELECT count(*) FROM predictions.{stage}",
        "SELECT count(*) FROM warehouse.customers",
        "SELECT count(*) FROM ml.runs",
        "INSERT INTO predictions.churn_scores VALUES ('2030-01-01', 1, 'x', 0.5, 1)",
        "DELETE FROM predictions.churn_scores_history",
        "CREATE TABLE predictions.mine (x int)",
    ],
)
def test_the_reader_role_reads_served_views_and_nothing_else(
    isolated: Settings, night: dict, statement: str
) -> None:
    stage = "churn_scores_stage_20991231_readertest"
    db.scalar(
        isolated.database_url,
        f"SET ROLE nightscore_writer; CREATE TABLE IF NOT EXISTS predictions.{stage} "
        "(LIKE predictions.churn_scores); SELECT 1",
    )
    reader = with_role(isolated.database_url, "nightscore_reader")
    assert db.scalar(reader, "SELECT count(*) FROM predictions.churn_scores_latest") > 0
    assert db.scalar(reader, "SELECT count(*) FROM predictions.churn_scores_history") > 0
    conn = db.connect(isolated.database_url)
    newest_partition = publish.published_partitions(conn, UC)[0][1]
    conn.close()
    sql_text = statement.format(partition=newest_partition, stage=stage)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        db.scalar(reader, sql_text)


def test_exact_deciles_in_bounded_memory_match_a_full_sort(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(4)
    n = 50_003
    probs = np.round(rng.beta(1.2, 15.0, n), 3)  # many ties
    keys = rng.permutation(n).astype(np.int64) + 1
    parts = []
    for i, sl in enumerate(np.array_split(np.arange(n), 3)):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(
            pa.table({"customer_id": keys[sl], "churn_probability": probs[sl]}),
            path,
            row_group_size=7000,
        )
        parts.append(ScoredPart(i, path, len(sl)))
    thresholds = binary_copy.decile_thresholds(UC, parts, batch_rows=5000)
    streamed = binary_copy.deciles_from_thresholds(probs, keys, thresholds)
    assert (streamed == publish.risk_deciles(probs, keys)).all()


def test_readers_never_see_an_empty_night_while_new_nights_are_published(
    isolated: Settings, night: dict
) -> None:
    """Each publish here is of a new, later night (the nightly case): the swap attaches a
    partition the readers' plans have not seen yet. Before the swap locked the served
    table, about one read in 2,000 counted 0 rows here."""
    newest = db.scalar(
        isolated.database_url,
        "SELECT max(score_date) FROM ml.publications WHERE use_case = %s",
        ("churn",),
    )

    def publishing() -> None:
        for i in range(8):
            republish(isolated, night, f"pub-new-{i}", newest + timedelta(days=1 + i))

    seen, worst = read_during(isolated, publishing)
    assert len(seen) > 100 and set(seen) == {night["rows"]}, Counter(seen)
    print(f"\n{len(seen)} reads during 8 new nights' publishes, worst {worst * 1000:.0f} ms")


@pytest.mark.parametrize("key_type", ["bigint", "text"])
def test_binary_copy_rows_read_back_as_written(database_url: str, key_type: str) -> None:
    import pyarrow as pa

    entity_keys = (
        pa.array([1, 2**40, 7], pa.int64())
        if key_type == "bigint"
        else pa.array(["a", "", "kéy-ü"], pa.string())
    )
    probs = np.array([0.0, 0.5, 1.0])
    deciles = np.array([1, 5, 10], dtype=np.int16)
    control = np.array([True, False, True])
    payload = (
        binary_copy.COPY_HEADER
        + binary_copy.copy_rows(SCORE_DATE, "v-1", entity_keys, probs, deciles, control)
        + binary_copy.COPY_TRAILER
    )
    conn = db.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE staged (score_date date, model_version text, "
                f"churn_probability float8, risk_decile smallint, control_group boolean, "
                f"customer_id {key_type})"
            )
            cur.copy_expert(
                "COPY staged FROM STDIN WITH (FORMAT binary)",
                io.BytesIO(payload),
            )
            cur.execute("SELECT * FROM staged")
            got = cur.fetchall()
    finally:
        conn.close()
    assert got == [
        (SCORE_DATE, "v-1", p, d, c, k)
        for p, d, c, k in zip(
            probs.tolist(), deciles.tolist(), control.tolist(), entity_keys.to_pylist(), strict=True
        )
    ]


@pytest.mark.parametrize("in_key_order", [True, False])
def test_parts_are_merged_into_key_order_every_row_once(tmp_path, in_key_order: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    keys = np.arange(1, 20_001, dtype=np.int64)
    which = rng.integers(0, 3, len(keys))
    parts = []
    for i in range(3):
        mine = keys[which == i] if in_key_order else rng.permutation(keys[which == i])
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(
            pa.table({"customer_id": mine, "churn_probability": mine / len(keys)}),
            path,
            row_group_size=1500,
        )
        parts.append(ScoredPart(i, path, len(mine)))
    merged = np.concatenate(
        [
            b.column(0).to_numpy()
            for b in binary_copy.key_ordered(parts, ["customer_id", "churn_probability"], 1000)
        ]
    )
    assert sorted(merged.tolist()) == keys.tolist()
    if in_key_order:
        assert (merged == keys).all()
