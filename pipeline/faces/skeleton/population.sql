-- The entities active as of :as_of (one row each), from facts dated before :as_of.
-- features.sql and labels.sql read it as the table `population`.
SELECT a.account_id
FROM accounts a
WHERE a.created_at < :as_of
  AND (a.closed_at IS NULL OR a.closed_at >= :as_of)
