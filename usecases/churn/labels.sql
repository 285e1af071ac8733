-- Churn label for every customer active as of :as_of: 1 if they cancelled on a day in
-- [:as_of, :label_end), else 0. Only valid once :label_end has passed (matured labels).
SELECT
    CAST(c.customer_id AS bigint) AS customer_id,
    CAST(EXISTS (
        SELECT 1 FROM cancellations x
        WHERE x.customer_id = c.customer_id
          AND x.cancel_date >= :as_of AND x.cancel_date < :label_end
    ) AS integer) AS label
FROM customers c
WHERE c.signup_date < :as_of
  AND NOT EXISTS (
      SELECT 1 FROM cancellations x
      WHERE x.customer_id = c.customer_id AND x.cancel_date < :as_of
  )
ORDER BY c.customer_id
