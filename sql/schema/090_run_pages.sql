-- What the campaign and monitoring DAGs' runs did, for their report pages
-- (pipeline/run_pages.py): each built audience with its exclusions by reason, and which
-- dates an Airflow run of those DAGs handled (the run's report tab opens their page).
CREATE TABLE IF NOT EXISTS monitoring.campaign_audiences (
    use_case      text        NOT NULL,
    score_date    date        NOT NULL,
    campaign      text        NOT NULL,
    model_version text        NOT NULL,
    policy        text        NOT NULL,
    band          bigint      NOT NULL,   -- entities in the top risk band
    audience      bigint      NOT NULL,
    control_band  bigint      NOT NULL,
    excluded      jsonb       NOT NULL,   -- reason -> entities of the band left out for it
    built_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, score_date)
);

CREATE TABLE IF NOT EXISTS monitoring.run_pages (
    dag_id      text        NOT NULL,
    run_id      text        NOT NULL,
    use_case    text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('campaign', 'monitoring')),
    score_date  date        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, run_id, score_date)
);
