-- How each published night actually performed once its labels matured (30 days later).
CREATE TABLE IF NOT EXISTS monitoring.realized_performance (
    use_case         text             NOT NULL,
    score_date       date             NOT NULL,
    model_version    text             NOT NULL,
    rows             bigint           NOT NULL,
    positives        bigint           NOT NULL,
    roc_auc          double precision,
    lift_top_decile  double precision,
    brier            double precision,
    ece              double precision,
    decile_rates     jsonb            NOT NULL,
    holdout_auc      double precision,
    evaluated_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, score_date, model_version)
);
