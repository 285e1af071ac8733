-- Per customer with an invoice issued in the 180 days before :as_of: the invoices paid late
-- or still unpaid past their due date, and those unpaid past due, as of :as_of (payments
-- dated before :as_of); invoice_rows counts the rows, so that a customer whose invoices all
-- left the 180 days leaves the state. From the facts; kept night to night by
-- billing_state_step.sql (usecase.yaml, states).
SELECT i.customer_id,
       count(*) FILTER (WHERE p.payment_date > i.due_date
                        OR (p.payment_date IS NULL AND i.due_date < :as_of)) AS late_payments_180d,
       count(*) FILTER (WHERE p.payment_date IS NULL AND i.due_date < :as_of) AS overdue_invoices,
       count(*)                                                               AS invoice_rows
FROM invoices i
LEFT JOIN payments p
       ON p.invoice_id = i.invoice_id AND p.payment_date < :as_of
WHERE i.issue_date >= CAST(:as_of AS date) - 180 AND i.issue_date < :as_of
GROUP BY i.customer_id
