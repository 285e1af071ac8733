-- The run ledger: one row per (use case, score date, run), with per-stage status and timings.
CREATE TABLE IF NOT EXISTS ml.runs (
    use_case          text        NOT NULL,
    score_date        date        NOT NULL,
    run_id            text        NOT NULL,
    status            text        NOT NULL DEFAULT 'running'
                      CHECK (status IN ('running', 'published', 'failed', 'stopped', 'dry_run')),
    model_version     text,
    snapshot_sha256   text,
    code_version      text,
    source_counts     jsonb       NOT NULL DEFAULT '{}',
    stages            jsonb       NOT NULL DEFAULT '{}',
    rows_published    bigint,
    error             text,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    PRIMARY KEY (use_case, score_date, run_id)
);
CREATE INDEX IF NOT EXISTS runs_published ON ml.runs (use_case, score_date)
    WHERE status = 'published';

-- Attempt number of each run for its date (1 for the first run of a date, then 2, ...).
ALTER TABLE ml.runs ADD COLUMN IF NOT EXISTS attempt integer;
ALTER TABLE ml.runs ADD COLUMN IF NOT EXISTS params jsonb NOT NULL DEFAULT '{}';
CREATE UNIQUE INDEX IF NOT EXISTS runs_attempt ON ml.runs (use_case, score_date, attempt);

-- Partitions dropped by retention.
CREATE TABLE IF NOT EXISTS ml.retention_log (
    use_case        text        NOT NULL,
    score_date      date        NOT NULL,
    partition_name  text        NOT NULL,
    rows            bigint      NOT NULL,
    keep            integer     NOT NULL,
    run_id          text,
    dropped_at      timestamptz NOT NULL DEFAULT now()
);

-- What is served: one row per (use case, score date), written by the publish transaction
-- itself (the same transaction that swaps the partition in). The *_latest views read it.
-- How a run ended is ml.runs.status; a stage failing after the swap fails the run but never
-- un-serves the night.
CREATE TABLE IF NOT EXISTS ml.publications (
    use_case        text        NOT NULL,
    score_date      date        NOT NULL,
    run_id          text        NOT NULL,
    model_version   text        NOT NULL,
    rows            bigint      NOT NULL,
    snapshot_sha256 text,
    published_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, score_date)
);
-- Deployments from before the publication record: what their ledger says was published.
INSERT INTO ml.publications (use_case, score_date, run_id, model_version, rows, snapshot_sha256, published_at)
SELECT DISTINCT ON (use_case, score_date) use_case, score_date, run_id, model_version,
       rows_published, snapshot_sha256, coalesce(finished_at, started_at)
FROM ml.runs
WHERE status = 'published' AND model_version IS NOT NULL AND rows_published IS NOT NULL
ORDER BY use_case, score_date, finished_at DESC NULLS LAST
ON CONFLICT (use_case, score_date) DO NOTHING;

-- Attempts whose process died (killed, the machine lost) are marked 'abandoned' by the
-- next attempt of the same date.
ALTER TABLE ml.runs DROP CONSTRAINT IF EXISTS runs_status_check;
ALTER TABLE ml.runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('running', 'published', 'failed', 'stopped', 'dry_run', 'abandoned'));

-- The publish lock: a row per use case, locked FOR UPDATE by publish and retention. Only
-- the writer may lock it (readers have no privilege on ml.*), unlike an advisory lock.
CREATE TABLE IF NOT EXISTS ml.publish_locks (
    use_case text PRIMARY KEY
);
