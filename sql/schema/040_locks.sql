-- Locks only the writer can take (pipeline/locks.py): one row per lock, locked FOR UPDATE
-- for a short critical section (a use case's ledger start, its registry changes), or held
-- FOR KEY SHARE by a live process's own connection as a liveness mark (a staging table).
-- Readers have no privilege on ml.* (990_roles.sql): unlike an advisory lock on a
-- predictable key, no reader can take one, hold up the pipeline or keep a dead attempt live.
CREATE TABLE IF NOT EXISTS ml.locks (
    key        text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON ml.locks FROM PUBLIC;
