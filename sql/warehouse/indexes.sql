-- Built after bulk loading (cheaper than maintaining them row by row during COPY).
-- Facts arrive in date order, so BRIN indexes on the date columns are tiny and exact enough.
CREATE UNIQUE INDEX IF NOT EXISTS customers_pkey_idx ON customers (customer_id);
CREATE INDEX IF NOT EXISTS usage_daily_date_brin ON usage_daily USING brin (usage_date);
CREATE INDEX IF NOT EXISTS invoices_issue_date_idx ON invoices (issue_date);
CREATE INDEX IF NOT EXISTS payments_invoice_idx ON payments (invoice_id);
CREATE INDEX IF NOT EXISTS tickets_opened_date_idx ON tickets (opened_date);
CREATE INDEX IF NOT EXISTS subscriptions_customer_idx ON subscriptions (customer_id, valid_from);
CREATE INDEX IF NOT EXISTS cancellations_customer_idx ON cancellations (customer_id);
