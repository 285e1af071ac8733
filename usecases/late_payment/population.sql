-- Customers active as of :as_of (signed up before, not cancelled before) who were
-- invoiced in the 60 days before :as_of.
SELECT c.customer_id, c.signup_date, c.country, c.contract_type
FROM customers c
WHERE c.signup_date < :as_of
  AND NOT EXISTS (
      SELECT 1 FROM cancellations x
      WHERE x.customer_id = c.customer_id AND x.cancel_date < :as_of
  )
  AND EXISTS (
      SELECT 1 FROM invoices i
      WHERE i.customer_id = c.customer_id
        AND i.issue_date >= CAST(:as_of AS date) - 60 AND i.issue_date < :as_of
  )
