-- Delayed messages, written from the internal delay queue and moved to their queue or topic by
-- the delay cron once due. A row is claimed (claim_token, claimed_until) before it is
-- published, and deleted, under that claim, once RabbitMQ confirmed it.
CREATE TABLE delayed_messages (
    id            uuid PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('queue', 'topic')),
    target        text NOT NULL,
    body          text NOT NULL,
    due_at        timestamptz NOT NULL,
    ttl_seconds   bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    claim_token   uuid,
    claimed_until timestamptz
);
CREATE INDEX delayed_messages_by_due ON delayed_messages (due_at);
CREATE INDEX delayed_messages_by_target ON delayed_messages (kind, target, due_at);
