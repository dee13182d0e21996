-- Settlements written from the internal settlements queue, which one consumer at a time applies
-- in queue order: ledger_progress holds the publishing time of the newest message up to which
-- every settlement has been applied. The republish cron acts on a missed deadline only once
-- that time has passed it, so an ack never loses a race against its redelivery, however long
-- PostgreSQL stalled.
CREATE TABLE ledger_progress (
    name            text PRIMARY KEY,
    applied_through timestamptz NOT NULL
);

-- A delivery's acked or nacked count is taken once, by whichever of its record and its
-- settlement is stored second; rows already there were counted.
ALTER TABLE settlements ADD COLUMN counted boolean NOT NULL DEFAULT true;
ALTER TABLE settlements ALTER COLUMN counted SET DEFAULT false;

-- 'returned': the hand-out failed after its record may have been sent, and the message went
-- back to its queue; the record, should it arrive, is done and never retried.
ALTER TABLE settlements DROP CONSTRAINT settlements_outcome_check;
ALTER TABLE settlements ADD CONSTRAINT settlements_outcome_check
    CHECK (outcome IN ('ack', 'nack', 'returned'));
