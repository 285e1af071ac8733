-- Churn features for every customer active as of :as_of, from facts dated strictly
-- before :as_of (the as-of day itself is not yet complete when the run starts).
-- Active as of D: signed up before D and not cancelled before D.
-- Every feature is cast to a fixed type: the result is the feature contract. The key is
-- left in the warehouse's type (nightscore stores it as entity.type): cast, it would hide
-- from PostgreSQL that the joins already give the rows in key order, and every row would
-- be sorted a second time.
-- usage_windows, plan_state and billing_state are kept night to night by nightscore
-- (usecase.yaml: windows and states).
WITH population AS (
    SELECT c.customer_id, c.signup_date, c.country, c.channel, c.contract_type,
           c.marketing_opt_in
    FROM customers c
    WHERE c.signup_date < :as_of
      AND NOT EXISTS (
          SELECT 1 FROM cancellations x
          WHERE x.customer_id = c.customer_id AND x.cancel_date < :as_of
      )
),
usage AS (  -- from the windows of usecase.yaml, kept night to night by nightscore
    SELECT w.customer_id,
           w.minutes_7d / 7.0 AS minutes_7d,
           w.minutes_30d / 30.0 AS minutes_30d,
           (w.minutes_60d - w.minutes_30d) / 30.0 AS minutes_prev_30d,
           w.data_mb_30d / 30.0 AS data_mb_30d,
           w.active_days_30d,
           w.last_usage_date
    FROM usage_windows w
),
support AS (
    SELECT t.customer_id,
           count(*) FILTER (WHERE t.opened_date >= CAST(:as_of AS date) - 30) AS tickets_30d,
           count(*) AS tickets_90d,
           count(*) FILTER (WHERE t.category IN ('billing', 'cancellation_request')) AS complaints_90d
    FROM tickets t
    WHERE t.opened_date >= CAST(:as_of AS date) - 90 AND t.opened_date < :as_of
    GROUP BY t.customer_id
)
SELECT
    p.customer_id                                                        AS customer_id,
    CAST(p.country AS text)                                              AS country,
    CAST(p.channel AS text)                                              AS channel,
    CAST(p.contract_type AS text)                                        AS contract_type,
    CAST(p.marketing_opt_in AS integer)                                  AS marketing_opt_in,
    CAST(CAST(:as_of AS date) - p.signup_date AS integer)                AS tenure_days,
    CAST(f.plan_id AS integer)                                           AS plan_id,
    CAST(f.monthly_fee AS double precision)                              AS monthly_fee,
    CAST(CASE WHEN f.monthly_fee_90d_ago > 0
              THEN (f.monthly_fee - f.monthly_fee_90d_ago) / f.monthly_fee_90d_ago
              ELSE 0 END AS double precision)                            AS fee_change_90d,
    CAST(coalesce(f.price_rises_180d, 0) AS integer)                     AS price_rises_180d,
    CAST(coalesce(u.minutes_7d, 0) AS double precision)                  AS minutes_7d,
    CAST(coalesce(u.minutes_30d, 0) AS double precision)                 AS minutes_30d,
    CAST(coalesce(u.minutes_prev_30d, 0) AS double precision)            AS minutes_prev_30d,
    CAST(CASE WHEN u.minutes_prev_30d > 0
              THEN u.minutes_30d / u.minutes_prev_30d END AS double precision) AS usage_trend,
    CAST(coalesce(u.data_mb_30d, 0) AS double precision)                 AS data_mb_30d,
    CAST(coalesce(u.active_days_30d, 0) AS integer)                      AS active_days_30d,
    CAST(CAST(:as_of AS date) - coalesce(u.last_usage_date,
         greatest(p.signup_date, CAST(:as_of AS date) - 61)) AS integer) AS days_since_last_usage,
    CAST(coalesce(b.late_payments_180d, 0) AS integer)                   AS late_payments_180d,
    CAST(coalesce(b.overdue_invoices, 0) AS integer)                     AS overdue_invoices,
    CAST(coalesce(s.tickets_30d, 0) AS integer)                          AS tickets_30d,
    CAST(coalesce(s.tickets_90d, 0) AS integer)                          AS tickets_90d,
    CAST(coalesce(s.complaints_90d, 0) AS integer)                       AS complaints_90d
FROM population p
LEFT JOIN plan_state f    ON f.customer_id = p.customer_id
LEFT JOIN usage u         ON u.customer_id = p.customer_id
LEFT JOIN billing_state b ON b.customer_id = p.customer_id
LEFT JOIN support s      ON s.customer_id = p.customer_id
ORDER BY p.customer_id
