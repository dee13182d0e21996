-- v2 publish dedup: a dedup_id is stored once per queue or topic within
-- delivery.dedup_window_seconds. A row is reserved before its message is published and marked
-- stored once RabbitMQ confirmed it; a reservation never marked (its call failed) is taken over
-- by the next message with that dedup_id, under the same message id.
CREATE TABLE dedup (
    scope text NOT NULL,
    dedup_id text NOT NULL,
    message_id uuid NOT NULL,
    stored boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, dedup_id)
);
CREATE INDEX dedup_created_at ON dedup (created_at);
