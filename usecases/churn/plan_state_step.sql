-- plan_state as of :as_of from plan_state as of the day before (read as plan_state): the
-- day before :as_of brings each customer's newest plan of that day; 91 days before, the
-- fee in force 90 days before :as_of; price rises enter the 180 days on the day before and
-- leave them 181 days before. The same columns and types as plan_state.sql.
WITH plan_new AS (
    SELECT DISTINCT ON (s.customer_id) s.customer_id, s.plan_id, s.monthly_fee
    FROM subscriptions s
    WHERE s.valid_from = CAST(:as_of AS date) - 1
    ORDER BY s.customer_id, s.subscription_id DESC
),
fee_90d_new AS (
    SELECT DISTINCT ON (s.customer_id) s.customer_id, s.monthly_fee
    FROM subscriptions s
    WHERE s.valid_from = CAST(:as_of AS date) - 91
    ORDER BY s.customer_id, s.subscription_id DESC
),
rises_moved AS (
    SELECT s.customer_id,
           count(*) FILTER (WHERE s.valid_from = CAST(:as_of AS date) - 1)
           - count(*) FILTER (WHERE s.valid_from = CAST(:as_of AS date) - 181) AS moved
    FROM subscriptions s
    WHERE s.change_reason = 'price_rise'
      AND s.valid_from IN (CAST(:as_of AS date) - 1, CAST(:as_of AS date) - 181)
    GROUP BY s.customer_id
)
SELECT coalesce(p.customer_id, n.customer_id)                          AS customer_id,
       CASE WHEN n.customer_id IS NOT NULL THEN n.plan_id ELSE p.plan_id END AS plan_id,
       CASE WHEN n.customer_id IS NOT NULL THEN CAST(n.monthly_fee AS double precision)
            ELSE p.monthly_fee END                                     AS monthly_fee,
       CASE WHEN e.customer_id IS NOT NULL THEN CAST(e.monthly_fee AS double precision)
            ELSE p.monthly_fee_90d_ago END                             AS monthly_fee_90d_ago,
       CAST(coalesce(p.price_rises_180d, 0) + coalesce(r.moved, 0) AS bigint) AS price_rises_180d
FROM plan_state p
FULL JOIN plan_new n ON n.customer_id = p.customer_id
LEFT JOIN fee_90d_new e ON e.customer_id = coalesce(p.customer_id, n.customer_id)
LEFT JOIN rises_moved r ON r.customer_id = coalesce(p.customer_id, n.customer_id)
