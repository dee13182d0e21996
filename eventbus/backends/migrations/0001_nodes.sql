-- The daemons of the cluster: each records itself at start and refreshes seen_at while it runs,
-- so /stats can show which peers are alive.
CREATE TABLE nodes (
    name       text PRIMARY KEY,
    version    text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL
);
