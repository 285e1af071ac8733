-- 1 if an invoice of the customer falls due in [:as_of, :label_end) and no payment came
-- by its due date, else 0. Every due date is before :label_end, so the answer is known
-- once the window has closed.
SELECT
    CAST(p.customer_id AS bigint) AS customer_id,
    CAST(EXISTS (
        SELECT 1 FROM invoices i
        WHERE i.customer_id = p.customer_id
          AND i.due_date >= :as_of AND i.due_date < :label_end
          AND NOT EXISTS (
              SELECT 1 FROM payments y
              WHERE y.invoice_id = i.invoice_id AND y.payment_date <= i.due_date
          )
    ) AS integer) AS label
FROM population p
