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
