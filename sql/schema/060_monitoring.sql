-- Every data quality check of every run, and the drift measures among them.
CREATE TABLE IF NOT EXISTS monitoring.checks (
    use_case     text        NOT NULL,
    score_date   date        NOT NULL,
    run_id       text        NOT NULL,
    stage        text        NOT NULL,
    check_name   text        NOT NULL,
    target       text        NOT NULL,
    severity     text        NOT NULL CHECK (severity IN ('fail', 'warn')),
    passed       boolean     NOT NULL,
    expected     text        NOT NULL,
    found        text        NOT NULL,
    message      text        NOT NULL,
    checked_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS checks_by_date ON monitoring.checks (use_case, score_date);

CREATE TABLE IF NOT EXISTS monitoring.drift (
    use_case     text             NOT NULL,
    score_date   date             NOT NULL,
    run_id       text             NOT NULL,
    feature      text             NOT NULL,
    psi          double precision NOT NULL,
    within_limit boolean          NOT NULL,
    measured_at  timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS drift_by_date ON monitoring.drift (use_case, score_date);

-- Rows per day of each dated source table as a run saw them (days before its run date, over
-- the days its checks scanned): a later run compares, and warns or stops when past days
-- changed (history rewritten after the fact).
CREATE TABLE IF NOT EXISTS monitoring.source_days (
    use_case     text        NOT NULL,
    score_date   date        NOT NULL,
    run_id       text        NOT NULL,
    source       text        NOT NULL,
    day          date        NOT NULL,
    rows         bigint      NOT NULL,
    PRIMARY KEY (use_case, run_id, source, day)
);
CREATE INDEX IF NOT EXISTS source_days_by_date ON monitoring.source_days (use_case, score_date);

-- A fingerprint of each day's content (db.fingerprint of the contract's columns): a day
-- restated in place, with the same row count, no longer matches.
ALTER TABLE monitoring.source_days ADD COLUMN IF NOT EXISTS content text;

-- Per day, what the source checks' grouped scan counted besides rows and content: non-null
-- values per declared column, then rows breaking each value rule, then NaN and infinite
-- values per floating column (pipeline.stages.source_scans): a later night reads only the
-- days that may have changed and takes the others from here.
ALTER TABLE monitoring.source_days ADD COLUMN IF NOT EXISTS tallies bigint[];

-- Per dated source table, what a run's scan keeps for the next night: the first day it
-- covers, the query it ran (shape), the rows it saw dated on or after its run date, and the
-- table's change counters and file read before its snapshot (NULL: none to trust).
CREATE TABLE IF NOT EXISTS monitoring.source_scans (
    use_case     text    NOT NULL,
    score_date   date    NOT NULL,
    run_id       text    NOT NULL,
    source       text    NOT NULL,
    first_day    date    NOT NULL,
    shape        text    NOT NULL,
    beyond       bigint  NOT NULL,
    relid        bigint,
    filenode     bigint,
    inserted     bigint,
    updated      bigint,
    deleted      bigint,
    stats_epoch  text,
    PRIMARY KEY (use_case, run_id, source)
);

-- Per relation of a contract (a rule across two joined tables), the rows a run found
-- breaking it and its query (shape): a later night counts only the pairs holding a row
-- from a day it reads (pipeline.stages.source_relations).
CREATE TABLE IF NOT EXISTS monitoring.source_relations (
    use_case     text    NOT NULL,
    score_date   date    NOT NULL,
    run_id       text    NOT NULL,
    relation     text    NOT NULL,
    shape        text    NOT NULL,
    broken       bigint  NOT NULL,
    PRIMARY KEY (use_case, run_id, relation)
);
