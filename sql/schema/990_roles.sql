-- Roles and privileges (the readers' contract). Runs last, after every object exists.
--   nightscore_writer    owns the serving schemas; the pipeline connects as (or SET ROLE to) it
--   nightscore_reader    applications: SELECT on the served views, nothing else
--   nightscore_campaign  the email service: the retention audience only
-- Login roles are created by the DBA, e.g. CREATE ROLE app LOGIN PASSWORD '...' IN ROLE nightscore_reader;
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['nightscore_writer', 'nightscore_reader', 'nightscore_campaign'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a concurrent init
            END;
        END IF;
    END LOOP;
END $$;

GRANT nightscore_writer TO CURRENT_USER;

-- The writer owns everything in the serving schemas (it swaps partitions, which needs ownership);
-- sequences owned by a column follow their table.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT n.nspname, c.relname,
               CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END AS kind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('ml', 'predictions', 'monitoring', 'campaigns')
          AND c.relkind IN ('r', 'p', 'v')
          AND NOT c.relispartition
          AND pg_get_userbyid(c.relowner) <> 'nightscore_writer'
    LOOP
        EXECUTE format('ALTER %s %I.%I OWNER TO nightscore_writer', r.kind, r.nspname, r.relname);
    END LOOP;
END $$;
ALTER SCHEMA ml OWNER TO nightscore_writer;
ALTER SCHEMA predictions OWNER TO nightscore_writer;
ALTER SCHEMA monitoring OWNER TO nightscore_writer;
ALTER SCHEMA campaigns OWNER TO nightscore_writer;
ALTER FUNCTION ml.forbid_change() OWNER TO nightscore_writer;

-- Readers: the served views only (granted per use case by sql/usecase/scores.sql).
-- Staging tables, base tables, ml.*, campaigns.*, the warehouse: nothing.
REVOKE ALL ON SCHEMA ml, monitoring, campaigns FROM nightscore_reader;
-- The pipeline's locks and liveness marks are row locks on these (pipeline/locks.py): only
-- the writer may take them, so no other role can hold up a night or keep a dead one live.
REVOKE ALL ON ml.locks, ml.runs, ml.publish_locks FROM PUBLIC, nightscore_reader, nightscore_campaign;
GRANT USAGE ON SCHEMA predictions TO nightscore_reader;

-- The email service: each use case's audience, send log and opt-outs (granted by
-- sql/usecase/campaign.sql) and nothing else of the serving database.
GRANT USAGE ON SCHEMA campaigns TO nightscore_campaign;
