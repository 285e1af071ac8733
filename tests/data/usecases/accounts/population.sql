-- Accounts opened before :as_of (New York days) and not cancelled before it.
SELECT a.account_ref, a.opened_at, a.region_code, a.tier
FROM accounts a
WHERE a.opened_at < CAST(:as_of AS timestamp) AT TIME ZONE 'America/New_York'
  AND NOT EXISTS (
      SELECT 1 FROM plan_changes c
      WHERE c.account_ref = a.account_ref AND c.status = 'cancelled'
        AND c.changed_at < CAST(:as_of AS timestamp)
  )
