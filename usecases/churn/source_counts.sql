-- Source row counts recorded in the run ledger: the size of each source as the run saw it
-- (facts before :as_of) and the volume of its last complete day. usage_daily is not counted
-- here: check_sources keeps its rows per day (daily_volume), and counting its 30 days again
-- would read 26M rows a night at 1M customers.
SELECT 'customers' AS source, count(*) AS rows_before, count(*) FILTER (WHERE signup_date >= CAST(:as_of AS date) - 1) AS rows_last_day
FROM customers WHERE signup_date < :as_of
UNION ALL
SELECT 'invoices', count(*), count(*) FILTER (WHERE issue_date >= CAST(:as_of AS date) - 1)
FROM invoices WHERE issue_date >= CAST(:as_of AS date) - 30 AND issue_date < :as_of
UNION ALL
SELECT 'tickets', count(*), count(*) FILTER (WHERE opened_date >= CAST(:as_of AS date) - 1)
FROM tickets WHERE opened_date >= CAST(:as_of AS date) - 30 AND opened_date < :as_of
UNION ALL
SELECT 'cancellations', count(*), count(*) FILTER (WHERE cancel_date >= CAST(:as_of AS date) - 1)
FROM cancellations WHERE cancel_date < :as_of
