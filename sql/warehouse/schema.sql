-- The synthetic telco warehouse. Facts are append-only and dated; nothing is updated
-- after the day it happened, so "as of D" is always "rows dated before D".
-- Applied by `nightscore warehouse seed` with search_path set to the warehouse schema.

DROP TABLE IF EXISTS plans, customers, subscriptions, usage_daily, invoices, payments,
    tickets, cancellations, generator_state CASCADE;

CREATE TABLE plans (
    plan_id      smallint      PRIMARY KEY,
    plan_name    text          NOT NULL,
    base_fee     numeric(10,2) NOT NULL,
    data_gb      integer       NOT NULL
);

CREATE TABLE customers (
    customer_id      integer  NOT NULL,
    signup_date      date     NOT NULL,
    country          text     NOT NULL,
    channel          text     NOT NULL,
    contract_type    text     NOT NULL,
    marketing_opt_in boolean  NOT NULL,
    first_name       text     NOT NULL,
    email            text     NOT NULL
);

-- One row per fee or plan change: the subscription in force on day X is the newest row
-- with valid_from <= X.
CREATE TABLE subscriptions (
    subscription_id bigint        NOT NULL,
    customer_id     integer       NOT NULL,
    plan_id         smallint      NOT NULL,
    monthly_fee     numeric(10,2) NOT NULL,
    valid_from      date          NOT NULL,
    change_reason   text          NOT NULL
);

CREATE TABLE usage_daily (
    customer_id integer  NOT NULL,
    usage_date  date     NOT NULL,
    minutes     integer  NOT NULL,
    data_mb     integer  NOT NULL,
    sessions    smallint NOT NULL
);

CREATE TABLE invoices (
    invoice_id  bigint        NOT NULL,
    customer_id integer       NOT NULL,
    issue_date  date          NOT NULL,
    due_date    date          NOT NULL,
    amount      numeric(10,2) NOT NULL
);

CREATE TABLE payments (
    invoice_id   bigint        NOT NULL,
    customer_id  integer       NOT NULL,
    payment_date date          NOT NULL,
    amount       numeric(10,2) NOT NULL
);

CREATE TABLE tickets (
    ticket_id   bigint  NOT NULL,
    customer_id integer NOT NULL,
    opened_date date    NOT NULL,
    category    text    NOT NULL
);

CREATE TABLE cancellations (
    customer_id integer NOT NULL,
    cancel_date date    NOT NULL,
    reason      text    NOT NULL
);

-- Bookkeeping of the generator only (lets `warehouse advance` continue deterministically).
CREATE TABLE generator_state (
    seed         bigint NOT NULL,
    start_date   date   NOT NULL,
    through_date date   NOT NULL,
    state        bytea  NOT NULL
);
