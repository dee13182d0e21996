-- A delayed message RabbitMQ could not take when it fell due (its queue missing or full, a
-- declaration refused) waits and is tried again after a back-off that doubles with each failure;
-- the last reason is shown by `eventbus delayed list`. Adding columns with constant defaults
-- rewrites nothing.
ALTER TABLE delayed_messages ADD COLUMN publish_failures integer NOT NULL DEFAULT 0;
ALTER TABLE delayed_messages ADD COLUMN last_failure text;
