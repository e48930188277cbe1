-- A replayed batch of block, unblock and alert rows lands once: inserts carry a deduplication token,
-- which a MergeTree honours only with a deduplication window.
ALTER TABLE budget_events MODIFY SETTING non_replicated_deduplication_window = 1000;
