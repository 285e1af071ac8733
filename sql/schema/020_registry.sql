-- Model registry: versions, evaluations and the append-only promotions log.
CREATE TABLE IF NOT EXISTS ml.model_versions (
    use_case          text        NOT NULL,
    version           text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    trained_as_of     date        NOT NULL,
    training_window   jsonb       NOT NULL,
    feature_schema    jsonb       NOT NULL,
    artifact_uri      text        NOT NULL,
    sha256            text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    library_versions  jsonb       NOT NULL,
    metrics           jsonb       NOT NULL,
    status            text        NOT NULL DEFAULT 'candidate'
                      CHECK (status IN ('candidate', 'shadow', 'champion', 'retired')),
    PRIMARY KEY (use_case, version)
);
-- At most one champion per use case.
CREATE UNIQUE INDEX IF NOT EXISTS model_versions_one_champion
    ON ml.model_versions (use_case) WHERE status = 'champion';

CREATE TABLE IF NOT EXISTS ml.evaluations (
    evaluation_id     bigserial   PRIMARY KEY,
    use_case          text        NOT NULL,
    challenger        text        NOT NULL,
    champion          text,
    holdout_as_of     date        NOT NULL,
    holdout_sha256    text        NOT NULL,
    metrics           jsonb       NOT NULL,
    intervals         jsonb       NOT NULL DEFAULT '{}',
    checks            jsonb       NOT NULL DEFAULT '[]',
    decision          text        NOT NULL
                      CHECK (decision IN ('promote', 'awaiting_approval', 'shadow', 'reject')),
    reasons           jsonb       NOT NULL,
    report_path       text,
    run_id            text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (use_case, challenger) REFERENCES ml.model_versions (use_case, version)
);

CREATE TABLE IF NOT EXISTS ml.promotions (
    promotion_id      bigserial   PRIMARY KEY,
    use_case          text        NOT NULL,
    action            text        NOT NULL CHECK (action IN ('promote', 'rollback')),
    version           text        NOT NULL,
    previous_version  text,
    effective_date    date        NOT NULL,
    actor             text        NOT NULL,
    reason            text        NOT NULL,
    run_id            text,
    at                timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (use_case, version) REFERENCES ml.model_versions (use_case, version)
);

-- The log is append-only: no updates, no deletes.
CREATE OR REPLACE FUNCTION ml.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP;
END $$;
DROP TRIGGER IF EXISTS promotions_append_only ON ml.promotions;
CREATE TRIGGER promotions_append_only BEFORE UPDATE OR DELETE ON ml.promotions
    FOR EACH ROW EXECUTE FUNCTION ml.forbid_change();

-- Retraining requested outside the cadence (drift or decay monitors, people); consumed by
-- the next run that retrains.
CREATE TABLE IF NOT EXISTS ml.retrain_requests (
    request_id        bigserial   PRIMARY KEY,
    use_case          text        NOT NULL,
    reason            text        NOT NULL,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    consumed_by_run   text
);

-- The sha256 of each model's card (model.json: features, window, drift reference), checked
-- when the card is read, as the artifact's sha256 is.
ALTER TABLE ml.model_versions ADD COLUMN IF NOT EXISTS card_sha256 text;

-- Evaluations judge pooled holdout dates, may find the challenger identical to the champion,
-- know whether the champion had decayed, and record the person who approved or rejected.
ALTER TABLE ml.evaluations ADD COLUMN IF NOT EXISTS holdout_dates jsonb NOT NULL DEFAULT '[]';
ALTER TABLE ml.evaluations ADD COLUMN IF NOT EXISTS decayed text;
ALTER TABLE ml.evaluations ADD COLUMN IF NOT EXISTS reviewed_by text;
ALTER TABLE ml.evaluations ADD COLUMN IF NOT EXISTS reviewed_at timestamptz;
ALTER TABLE ml.evaluations DROP CONSTRAINT IF EXISTS evaluations_decision_check;
ALTER TABLE ml.evaluations ADD CONSTRAINT evaluations_decision_check CHECK (decision IN
    ('promote', 'awaiting_approval', 'shadow', 'reject', 'identical', 'approved', 'rejected'));
