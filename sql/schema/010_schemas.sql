-- Serving database layout. Every statement is idempotent: `nightscore db init` may run
-- any number of times.
CREATE SCHEMA IF NOT EXISTS ml;
CREATE SCHEMA IF NOT EXISTS predictions;
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE SCHEMA IF NOT EXISTS campaigns;
