-- 1 if the account cancelled in [:as_of, :label_end) (New York days), else 0.
SELECT
    p.account_ref,
    EXISTS (
        SELECT 1 FROM plan_changes c
        WHERE c.account_ref = p.account_ref AND c.status = 'cancelled'
          AND c.changed_at >= CAST(:as_of AS timestamp)
          AND c.changed_at < CAST(:label_end AS timestamp)
    ) AS label
FROM population p
