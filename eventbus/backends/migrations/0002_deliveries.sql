-- Delivery bookkeeping. A delivery is one hand-out of a message to a subscriber; its record is
-- written from the internal confirm queue, its ack or nack (a settlement) from the internal ack
-- queue, in either order. The republish cron acts on deliveries that are not done and are due:
-- unsettled past their deadline, or nacked longer ago than the nack delay.
CREATE TABLE deliveries (
    id            uuid PRIMARY KEY,
    message_id    uuid NOT NULL,
    queue         text NOT NULL,
    body          text NOT NULL,
    attempt       integer NOT NULL,
    delivered_at  timestamptz NOT NULL,
    deadline      timestamptz NOT NULL,
    expires_at    timestamptz,
    done          boolean NOT NULL DEFAULT false,
    outcome       text,             -- when done: acked, retried, dead, expired
    claim_token   uuid,
    claimed_until timestamptz
);
CREATE INDEX deliveries_open_by_deadline ON deliveries (deadline) WHERE NOT done;

CREATE TABLE settlements (
    delivery_id uuid PRIMARY KEY,
    outcome     text NOT NULL CHECK (outcome IN ('ack', 'nack')),
    settled_at  timestamptz NOT NULL
);
CREATE INDEX settlements_nacked ON settlements (settled_at) WHERE outcome = 'nack';

-- Messages that failed max_retries + 1 deliveries: kept with their body until requeued.
CREATE TABLE dead_letters (
    queue            text NOT NULL,
    message_id       uuid NOT NULL,
    body             text NOT NULL,
    attempts         integer NOT NULL,
    last_delivery_id uuid NOT NULL,
    last_failure_at  timestamptz NOT NULL,
    dead_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, message_id)
);
