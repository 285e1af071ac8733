-- billing_state as of :as_of from billing_state as of the day before (read as
-- billing_state). An invoice counts differently on :as_of than the day before only if it
-- was issued the day before (it enters the 180 days) or 181 days before (it leaves them),
-- fell due the day before, or was paid the day before: those invoices are counted as of
-- both days, exactly as billing_state.sql counts, and the difference is added.
-- Each way an invoice is touched is its own SELECT, so that each can read its day through
-- an index on its date column rather than scan every invoice.
WITH touched AS (
    SELECT i.invoice_id, i.customer_id, i.issue_date, i.due_date
    FROM invoices i
    WHERE i.issue_date IN (CAST(:as_of AS date) - 1, CAST(:as_of AS date) - 181)
    UNION
    SELECT i.invoice_id, i.customer_id, i.issue_date, i.due_date
    FROM invoices i
    WHERE i.due_date = CAST(:as_of AS date) - 1
    UNION
    SELECT i.invoice_id, i.customer_id, i.issue_date, i.due_date
    FROM payments p
    JOIN invoices i ON i.invoice_id = p.invoice_id
    WHERE p.payment_date = CAST(:as_of AS date) - 1
),
counted AS (
    SELECT t.customer_id,
           CASE WHEN p.payment_date > t.due_date
                     OR (p.payment_date IS NULL AND t.due_date < :as_of) THEN 1 ELSE 0 END AS late,
           CASE WHEN p.payment_date IS NULL AND t.due_date < :as_of THEN 1 ELSE 0 END AS overdue,
           1 AS rows
    FROM touched t
    LEFT JOIN payments p ON p.invoice_id = t.invoice_id AND p.payment_date < :as_of
    WHERE t.issue_date >= CAST(:as_of AS date) - 180 AND t.issue_date < :as_of
    UNION ALL
    SELECT t.customer_id,
           -CASE WHEN p.payment_date > t.due_date
                      OR (p.payment_date IS NULL AND t.due_date < CAST(:as_of AS date) - 1)
                 THEN 1 ELSE 0 END,
           -CASE WHEN p.payment_date IS NULL AND t.due_date < CAST(:as_of AS date) - 1
                 THEN 1 ELSE 0 END,
           -1
    FROM touched t
    LEFT JOIN payments p
           ON p.invoice_id = t.invoice_id AND p.payment_date < CAST(:as_of AS date) - 1
    WHERE t.issue_date >= CAST(:as_of AS date) - 181 AND t.issue_date < CAST(:as_of AS date) - 1
),
moved AS (
    SELECT customer_id, sum(late) AS late, sum(overdue) AS overdue, sum(rows) AS rows
    FROM counted
    GROUP BY customer_id
)
SELECT coalesce(b.customer_id, m.customer_id)                                   AS customer_id,
       CAST(coalesce(b.late_payments_180d, 0) + coalesce(m.late, 0) AS bigint)  AS late_payments_180d,
       CAST(coalesce(b.overdue_invoices, 0) + coalesce(m.overdue, 0) AS bigint) AS overdue_invoices,
       CAST(coalesce(b.invoice_rows, 0) + coalesce(m.rows, 0) AS bigint)        AS invoice_rows
FROM billing_state b
FULL JOIN moved m ON m.customer_id = b.customer_id
WHERE coalesce(b.invoice_rows, 0) + coalesce(m.rows, 0) > 0
