-- One row per entity of the population, computed only from facts dated before :as_of
-- (the run at D may not see the day D itself). Cast every column to a fixed type: the
-- result is the model's feature schema. Text columns become categories.
SELECT
    p.account_id,
    CAST(count(e.*) AS integer)                                   AS events_30d,
    CAST(CAST(:as_of AS date) - max(CAST(e.occurred_at AS date)) AS integer) AS days_since_last_event
FROM population p
LEFT JOIN events e
       ON e.account_id = p.account_id
      AND e.occurred_at >= CAST(:as_of AS date) - 30
      AND e.occurred_at < :as_of
GROUP BY p.account_id
