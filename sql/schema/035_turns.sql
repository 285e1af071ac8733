-- Whose turn it is to run a night of a use case: one run at a time, scheduled, triggered or
-- backfilled alike (Airflow's max_active_runs does not hold backfill runs). A run takes the
-- row when it starts and gives it back when its report is written; a run that died without
-- giving it back loses it to the next one (pipeline/turns.py). Only the writer may lock it.
CREATE TABLE IF NOT EXISTS ml.night_turns (
    use_case  text PRIMARY KEY,
    run_id    text,
    taken_at  timestamptz
);
