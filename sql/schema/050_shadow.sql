-- Shadow scores: a challenger that was not promoted is scored every night next to the
-- champion, never into the served table. One row per (score_date, model_version, customer).
CREATE TABLE IF NOT EXISTS predictions.churn_scores_shadow (
    score_date        date             NOT NULL,
    model_version     text             NOT NULL,
    customer_id       bigint           NOT NULL,
    churn_probability double precision NOT NULL CHECK (churn_probability BETWEEN 0 AND 1),
    risk_decile       smallint         NOT NULL CHECK (risk_decile BETWEEN 1 AND 10),
    PRIMARY KEY (score_date, model_version, customer_id)
);

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
