-- Audience policies: how a campaign ranks whom to contact. Ranking by risk needs no entry;
-- each uplift model trained from the campaigns' matured outcomes (contacted vs control) is
-- a version here, with the out-of-time evidence and gate checks that decided its fate.
CREATE TABLE IF NOT EXISTS ml.policies (
    use_case          text        NOT NULL,
    version           text        NOT NULL,
    rank_by           text        NOT NULL CHECK (rank_by IN ('uplift')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    trained_through   date        NOT NULL,  -- newest weekly cohort it learned from or was tested on
    artifact_uri      text        NOT NULL,
    sha256            text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    feature_schema    jsonb       NOT NULL,
    training          jsonb       NOT NULL,  -- campaigns, contacted, control, positives
    evidence          jsonb       NOT NULL,  -- Qini / AUUC out of time, with intervals
    checks            jsonb       NOT NULL,
    decision          text        NOT NULL
                      CHECK (decision IN ('promote', 'awaiting_approval', 'shadow', 'reject')),
    status            text        NOT NULL DEFAULT 'candidate'
                      CHECK (status IN ('candidate', 'champion', 'retired')),
    report_path       text,
    run_id            text,
    PRIMARY KEY (use_case, version)
);
-- At most one policy in force per use case.
CREATE UNIQUE INDEX IF NOT EXISTS policies_one_champion
    ON ml.policies (use_case) WHERE status = 'champion';

-- Who put which policy in force, when and why: append-only, as ml.promotions.
CREATE TABLE IF NOT EXISTS ml.policy_promotions (
    promotion_id      bigserial   PRIMARY KEY,
    use_case          text        NOT NULL,
    version           text        NOT NULL,
    previous_version  text,
    actor             text        NOT NULL,
    reason            text        NOT NULL,
    run_id            text,
    at                timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (use_case, version) REFERENCES ml.policies (use_case, version)
);
DROP TRIGGER IF EXISTS policy_promotions_append_only ON ml.policy_promotions;
CREATE TRIGGER policy_promotions_append_only BEFORE UPDATE OR DELETE ON ml.policy_promotions
    FOR EACH ROW EXECUTE FUNCTION ml.forbid_change();

-- The person who approved or rejected a policy awaiting approval, and when.
ALTER TABLE ml.policies ADD COLUMN IF NOT EXISTS reviewed_by text;
ALTER TABLE ml.policies ADD COLUMN IF NOT EXISTS reviewed_at timestamptz;
ALTER TABLE ml.policies DROP CONSTRAINT IF EXISTS policies_decision_check;
ALTER TABLE ml.policies ADD CONSTRAINT policies_decision_check CHECK (decision IN
    ('promote', 'awaiting_approval', 'shadow', 'reject', 'approved', 'rejected'));
