-- Payment behaviour of the population, from facts dated before :as_of.
WITH billing AS (
    SELECT i.customer_id,
           count(*) AS invoices_180d,
           count(*) FILTER (WHERE p.payment_date > i.due_date
                            OR (p.payment_date IS NULL AND i.due_date < :as_of)) AS late_180d,
           count(*) FILTER (WHERE p.payment_date IS NULL AND i.due_date < :as_of) AS overdue_now,
           avg(GREATEST(p.payment_date - i.due_date, 0)) AS days_late_avg_180d,
           sum(i.amount) FILTER (WHERE p.payment_date IS NULL) AS open_amount,
           max(p.payment_date) AS last_payment
    FROM invoices i
    LEFT JOIN payments p ON p.invoice_id = i.invoice_id AND p.payment_date < :as_of
    WHERE i.issue_date >= CAST(:as_of AS date) - 180 AND i.issue_date < :as_of
    GROUP BY i.customer_id
),
fee AS (
    SELECT DISTINCT ON (s.customer_id) s.customer_id, s.monthly_fee
    FROM subscriptions s
    WHERE s.valid_from < :as_of
    ORDER BY s.customer_id, s.valid_from DESC, s.subscription_id DESC
),
complaints AS (
    SELECT t.customer_id, count(*) AS billing_tickets_90d
    FROM tickets t
    WHERE t.category = 'billing'
      AND t.opened_date >= CAST(:as_of AS date) - 90 AND t.opened_date < :as_of
    GROUP BY t.customer_id
)
SELECT
    CAST(p.customer_id AS bigint)                               AS customer_id,
    CAST(p.country AS text)                                     AS country,
    CAST(p.contract_type AS text)                               AS contract_type,
    CAST(CAST(:as_of AS date) - p.signup_date AS integer)       AS tenure_days,
    CAST(coalesce(f.monthly_fee, 0) AS double precision)        AS monthly_fee,
    CAST(coalesce(b.invoices_180d, 0) AS integer)               AS invoices_180d,
    CAST(coalesce(b.late_180d, 0) AS integer)                   AS late_payments_180d,
    CAST(coalesce(b.overdue_now, 0) AS integer)                 AS overdue_invoices,
    CAST(b.days_late_avg_180d AS double precision)              AS days_late_avg_180d,
    CAST(coalesce(b.open_amount, 0) AS double precision)        AS open_amount,
    CAST(CAST(:as_of AS date) - b.last_payment AS integer)      AS days_since_last_payment,
    CAST(coalesce(k.billing_tickets_90d, 0) AS integer)         AS billing_tickets_90d
FROM population p
LEFT JOIN billing b    ON b.customer_id = p.customer_id
LEFT JOIN fee f        ON f.customer_id = p.customer_id
LEFT JOIN complaints k ON k.customer_id = p.customer_id
