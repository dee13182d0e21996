-- Keys the daemons of one cluster share. 'delivery_ids' signs the delivery ids subscribe hands
-- out, so an ack or nack of an id the bus never issued is refused without storing anything.
-- gen_random_uuid() draws from PostgreSQL's strong random source: 244 random bits in all.
CREATE TABLE cluster_keys (
    name       text PRIMARY KEY,
    key        bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cluster_keys (name, key)
VALUES ('delivery_ids', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
                               'hex'));
