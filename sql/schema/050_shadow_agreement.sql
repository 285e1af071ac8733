-- How far the shadow model's ranking is from the champion's, per night.
CREATE TABLE IF NOT EXISTS monitoring.shadow_agreement (
    use_case           text        NOT NULL,
    score_date         date        NOT NULL,
    champion           text        NOT NULL,
    shadow             text        NOT NULL,
    rows               bigint      NOT NULL,
    spearman           double precision NOT NULL,
    top_decile_overlap double precision NOT NULL,
    audience_capacity  integer     NOT NULL,
    audience_enter     integer     NOT NULL,
    audience_leave     integer     NOT NULL,
    run_id             text        NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, score_date, shadow)
);
