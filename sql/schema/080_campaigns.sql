-- Retention campaign feed: who is contacted (and why), who is held out, who was emailed.

-- Per score_date: the top risk band, up to the campaign's capacity, opted in, outside the
-- control group and not contacted by another campaign within the suppression window.
-- Holds names and email addresses: readable by nightscore_campaign only (990_roles.sql).
CREATE TABLE IF NOT EXISTS campaigns.retention_audience (
    score_date        date             NOT NULL,
    campaign          text             NOT NULL,
    customer_id       bigint           NOT NULL,
    audience_rank     integer          NOT NULL,
    model_version     text             NOT NULL,
    churn_probability double precision NOT NULL,
    risk_decile       smallint         NOT NULL,
    first_name        text             NOT NULL,
    email             text             NOT NULL,
    reasons           text[]           NOT NULL CHECK (cardinality(reasons) BETWEEN 1 AND 3),
    reason_features   text[]           NOT NULL,
    built_at          timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (score_date, customer_id),
    UNIQUE (campaign, customer_id)
);

-- The control group's members who would have been in the audience (same band, opted in,
-- not suppressed): the comparison for uplift. No contact details.
CREATE TABLE IF NOT EXISTS campaigns.control_band (
    score_date        date             NOT NULL,
    campaign          text             NOT NULL,
    customer_id       bigint           NOT NULL,
    model_version     text             NOT NULL,
    churn_probability double precision NOT NULL,
    risk_decile       smallint         NOT NULL,
    PRIMARY KEY (score_date, customer_id)
);

-- One row per (campaign, customer), ever: the key that keeps retries, re-runs and
-- backfills from emailing anyone twice. 'sending' is claimed before the SMTP call and
-- becomes 'sent' after it; a 'sending' row left by a killed run is never retried
-- (the message may have left), it is reported as unconfirmed.
CREATE TABLE IF NOT EXISTS campaigns.send_log (
    campaign     text        NOT NULL,
    customer_id  bigint      NOT NULL,
    score_date   date        NOT NULL,
    run_id       text        NOT NULL,
    message_id   text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('sending', 'sent', 'failed')),
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    error        text,
    PRIMARY KEY (campaign, customer_id)
);
CREATE INDEX IF NOT EXISTS send_log_by_customer ON campaigns.send_log (customer_id, claimed_at);

-- Unsubscribes reported by the email service; honoured when the audience is built and
-- again just before each message is sent.
CREATE TABLE IF NOT EXISTS campaigns.opt_outs (
    customer_id  bigint      PRIMARY KEY,
    opted_out_at timestamptz NOT NULL DEFAULT now(),
    source       text        NOT NULL DEFAULT 'email_service'
);

-- Churn of contacted customers vs the control band, once labels have matured.
CREATE TABLE IF NOT EXISTS monitoring.campaign_uplift (
    use_case          text             NOT NULL,
    campaign          text             NOT NULL,
    score_date        date             NOT NULL,
    contacted         bigint           NOT NULL,
    contacted_churned bigint           NOT NULL,
    control           bigint           NOT NULL,
    control_churned   bigint           NOT NULL,
    contacted_rate    double precision,
    control_rate      double precision,
    uplift            double precision,  -- control_rate - contacted_rate: churn prevented
    ci_low            double precision,
    ci_high           double precision,
    evaluated_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, campaign)
);
