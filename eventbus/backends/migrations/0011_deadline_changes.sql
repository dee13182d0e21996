-- New ack deadlines subscribers asked for recorded deliveries (v2 ModifyAckDeadline). Each one
-- moves deliveries.deadline while the delivery is open, and is kept here as well: it may be
-- stored before the delivery's record (the two travel through different internal queues), which
-- then takes it, and of two changes stored out of order the one asked for last wins. Kept until
-- a minute after its deadline.
CREATE TABLE deadline_changes (
    delivery_id uuid PRIMARY KEY,
    deadline    timestamptz NOT NULL,
    asked_at    timestamptz NOT NULL
);
CREATE INDEX deadline_changes_by_deadline ON deadline_changes (deadline);
