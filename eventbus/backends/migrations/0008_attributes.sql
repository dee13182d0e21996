-- Message attributes (a JSON object of strings; NULL: none) and the time the message was first
-- published, kept with every delivery, dead letter and delayed message so that both survive
-- retries, dead-lettering and requeueing. A retry that waits as a delayed message keeps its
-- attempt. Adding columns without defaults, or with constant ones, rewrites nothing.
ALTER TABLE deliveries ADD COLUMN attributes jsonb, ADD COLUMN published_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN attributes jsonb, ADD COLUMN published_at timestamptz;
ALTER TABLE delayed_messages ADD COLUMN attributes jsonb, ADD COLUMN published_at timestamptz,
    ADD COLUMN attempt integer NOT NULL DEFAULT 1;
