-- Per customer with a subscription before :as_of: the plan in force as of :as_of, the fee
-- in force 90 days before, and the price rises of the last 180 days; from the facts.
-- Kept night to night by plan_state_step.sql (usecase.yaml, states).
WITH plan_now AS (
    SELECT DISTINCT ON (s.customer_id) s.customer_id, s.plan_id, s.monthly_fee
    FROM subscriptions s
    WHERE s.valid_from < :as_of
    ORDER BY s.customer_id, s.valid_from DESC, s.subscription_id DESC
),
plan_90d_ago AS (
    SELECT DISTINCT ON (s.customer_id) s.customer_id, s.monthly_fee
    FROM subscriptions s
    WHERE s.valid_from < CAST(:as_of AS date) - 90
    ORDER BY s.customer_id, s.valid_from DESC, s.subscription_id DESC
),
price_rises AS (
    SELECT s.customer_id, count(*) AS price_rises_180d
    FROM subscriptions s
    WHERE s.change_reason = 'price_rise'
      AND s.valid_from >= CAST(:as_of AS date) - 180 AND s.valid_from < :as_of
    GROUP BY s.customer_id
)
SELECT n.customer_id,
       n.plan_id,
       CAST(n.monthly_fee AS double precision)                AS monthly_fee,
       CAST(e.monthly_fee AS double precision)                AS monthly_fee_90d_ago,
       CAST(coalesce(r.price_rises_180d, 0) AS bigint)        AS price_rises_180d
FROM plan_now n
LEFT JOIN plan_90d_ago e ON e.customer_id = n.customer_id
LEFT JOIN price_rises r  ON r.customer_id = n.customer_id
