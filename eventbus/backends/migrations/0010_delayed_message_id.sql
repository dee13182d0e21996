-- A delayed row may carry the id of a message published before: a retry waiting out its
-- backoff keeps its message's id, while its row id names this one wait (a message of a topic
-- nacked by two groups waits twice). NULL: the row's id is the message id.
ALTER TABLE delayed_messages ADD COLUMN message_id uuid;
