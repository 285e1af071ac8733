-- Campaign measurements shared by every use case. The audience, control band, send log and
-- opt-out tables are each use case's own (sql/usecase/campaign.sql, from its config).

-- Outcome of contacted entities vs the control band, once labels have matured.
CREATE TABLE IF NOT EXISTS monitoring.campaign_uplift (
    use_case          text             NOT NULL,
    campaign          text             NOT NULL,
    score_date        date             NOT NULL,
    contacted         bigint           NOT NULL,
    contacted_positives bigint         NOT NULL,
    control           bigint           NOT NULL,
    control_positives bigint           NOT NULL,
    contacted_rate    double precision,
    control_rate      double precision,
    uplift            double precision,  -- control_rate - contacted_rate: outcomes prevented
    ci_low            double precision,
    ci_high           double precision,
    evaluated_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, campaign)
);

-- Earlier releases named the outcome counts after churn.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'monitoring'
               AND table_name = 'campaign_uplift' AND column_name = 'contacted_churned') THEN
        ALTER TABLE monitoring.campaign_uplift RENAME COLUMN contacted_churned TO contacted_positives;
        ALTER TABLE monitoring.campaign_uplift RENAME COLUMN control_churned TO control_positives;
    END IF;
END $$;

-- The uplift compares first selections only (pipeline.policy.campaign_groups); the contacted
-- and control members an earlier campaign had selected are counted here, left out of it. A
-- campaign measured before (NULL) is measured again.
ALTER TABLE monitoring.campaign_uplift ADD COLUMN IF NOT EXISTS repeat_contacted bigint;
ALTER TABLE monitoring.campaign_uplift ADD COLUMN IF NOT EXISTS repeat_control bigint;
