-- Usage and plan of each account, from facts before :as_of (New York midnight).
WITH bounds AS (
    SELECT CAST(:as_of AS timestamp) AT TIME ZONE 'America/New_York' AS t_end,
           CAST(:as_of AS timestamp) AS local_end
),
usage AS (
    SELECT e.account_ref,
           count(*) FILTER (WHERE e.happened_at >= b.t_end - interval '7 days') AS events_7d,
           count(*) AS events_28d,
           max(e.happened_at) AS last_event
    FROM activity e, bounds b
    WHERE e.happened_at >= b.t_end - interval '28 days' AND e.happened_at < b.t_end
    GROUP BY e.account_ref
),
last_seen AS (
    SELECT e.account_ref, max(e.happened_at) AS last_event
    FROM activity e, bounds b
    WHERE e.happened_at < b.t_end
    GROUP BY e.account_ref
),
seats_now AS (
    SELECT DISTINCT ON (c.account_ref) c.account_ref, c.seats
    FROM plan_changes c, bounds b
    WHERE c.changed_at < b.local_end
    ORDER BY c.account_ref, c.changed_at DESC
),
seats_before AS (
    SELECT DISTINCT ON (c.account_ref) c.account_ref, c.seats
    FROM plan_changes c, bounds b
    WHERE c.changed_at < b.local_end - interval '60 days'
    ORDER BY c.account_ref, c.changed_at DESC
)
SELECT
    p.account_ref,
    CAST(p.tier AS text)                                                  AS tier,
    CAST(r.region_name AS text)                                           AS region,
    CAST(r.in_emea AS integer)                                            AS in_emea,
    CAST(extract(epoch FROM b.t_end - p.opened_at) / 86400 AS integer)    AS tenure_days,
    CAST(coalesce(n.seats, 0) AS integer)                                 AS seats,
    CAST(coalesce(n.seats, 0) - coalesce(s.seats, n.seats, 0) AS integer) AS seats_change_60d,
    CAST(coalesce(u.events_7d, 0) AS integer)                             AS events_7d,
    CAST(coalesce(u.events_28d, 0) AS integer)                            AS events_28d,
    CAST(extract(epoch FROM b.t_end - l.last_event) / 86400 AS double precision) AS days_since_activity
FROM population p
CROSS JOIN bounds b
JOIN regions r        ON r.region_code = p.region_code
LEFT JOIN usage u     ON u.account_ref = p.account_ref
LEFT JOIN last_seen l ON l.account_ref = p.account_ref
LEFT JOIN seats_now n ON n.account_ref = p.account_ref
LEFT JOIN seats_before s ON s.account_ref = p.account_ref
