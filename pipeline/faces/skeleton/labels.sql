-- The outcome of each entity of the population: 1 if it happened in [:as_of, :label_end),
-- else 0. Used only once :label_end has passed.
SELECT
    p.account_id,
    CAST(EXISTS (
        SELECT 1 FROM accounts a
        WHERE a.account_id = p.account_id
          AND a.closed_at >= :as_of AND a.closed_at < :label_end
    ) AS integer) AS label
FROM population p
