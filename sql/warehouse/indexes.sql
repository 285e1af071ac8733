-- Built after bulk loading (cheaper than maintaining them row by row during COPY).
-- Facts arrive in date order, so BRIN indexes on the date columns are tiny and exact enough.
-- Each fact key is a unique index on NOT NULL columns, as a warehouse's primary keys are:
-- the source checks take such an index as the proof of the contract's unique key.
CREATE UNIQUE INDEX IF NOT EXISTS customers_pkey_idx ON customers (customer_id);
CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_pkey_idx ON subscriptions (subscription_id);
CREATE UNIQUE INDEX IF NOT EXISTS invoices_pkey_idx ON invoices (invoice_id);
CREATE UNIQUE INDEX IF NOT EXISTS tickets_pkey_idx ON tickets (ticket_id);
CREATE INDEX IF NOT EXISTS usage_daily_date_brin ON usage_daily USING brin (usage_date);
CREATE INDEX IF NOT EXISTS invoices_issue_date_idx ON invoices (issue_date);
CREATE INDEX IF NOT EXISTS invoices_due_date_brin ON invoices USING brin (due_date);
CREATE UNIQUE INDEX IF NOT EXISTS payments_invoice_idx ON payments (invoice_id);
CREATE INDEX IF NOT EXISTS payments_date_brin ON payments USING brin (payment_date);
CREATE INDEX IF NOT EXISTS tickets_opened_date_idx ON tickets (opened_date);
CREATE INDEX IF NOT EXISTS subscriptions_customer_idx ON subscriptions (customer_id, valid_from);
CREATE UNIQUE INDEX IF NOT EXISTS cancellations_customer_idx ON cancellations (customer_id);
