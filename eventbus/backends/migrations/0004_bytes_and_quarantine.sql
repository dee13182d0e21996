-- Message bodies as bytes: a body PostgreSQL cannot keep as text (a NUL character, bytes that
-- are not UTF-8) must never fail a batch.
ALTER TABLE deliveries ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8');
ALTER TABLE dead_letters ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8');
ALTER TABLE delayed_messages ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8');

-- Why a message became a dead letter when it is not the usual "failed max_retries + 1 times"
-- (RabbitMQ refused its retry, say); NULL for the usual case.
ALTER TABLE dead_letters ADD COLUMN reason text;

-- A delayed message RabbitMQ or its client library refused when it fell due stays here, set
-- aside: never claimed again, listed with its reason by `eventbus delayed list`, cancellable.
ALTER TABLE delayed_messages ADD COLUMN quarantined_at timestamptz;
ALTER TABLE delayed_messages ADD COLUMN quarantine_reason text;

-- Internal-queue messages PostgreSQL refused (or that could not be read), kept as they came
-- for an operator to look at, instead of being dropped.
CREATE TABLE quarantine (
    id             bigserial PRIMARY KEY,
    source         text NOT NULL,            -- the internal queue it came from
    body           bytea NOT NULL,           -- the raw message
    reason         text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);
