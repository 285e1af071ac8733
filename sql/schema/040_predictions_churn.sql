-- Served churn scores, one partition per score_date (swapped in atomically by publish).
CREATE TABLE IF NOT EXISTS predictions.churn_scores (
    score_date        date             NOT NULL,
    customer_id       bigint           NOT NULL,
    model_version     text             NOT NULL,
    churn_probability double precision NOT NULL,
    risk_decile       smallint         NOT NULL,
    control_group     boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (score_date, customer_id)
) PARTITION BY RANGE (score_date);

-- The permanent campaign control group (a salted hash of customer_id, see
-- pipeline/campaign.py): never contacted, whatever the run, model or backfill.
ALTER TABLE predictions.churn_scores
    ADD COLUMN IF NOT EXISTS control_group boolean NOT NULL DEFAULT false;

-- The newest published date only. Backfilling an older date never moves it backwards.
CREATE OR REPLACE VIEW predictions.churn_scores_latest AS
SELECT s.*
FROM predictions.churn_scores s
WHERE s.score_date = (
    SELECT max(r.score_date) FROM ml.runs r
    WHERE r.use_case = 'churn' AND r.status = 'published'
);

-- Every published date (a customer's score history). Readers query views, never the table.
CREATE OR REPLACE VIEW predictions.churn_scores_history AS
SELECT score_date, customer_id, model_version, churn_probability, risk_decile, control_group
FROM predictions.churn_scores;
