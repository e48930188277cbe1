-- The next Kafka offset to land per topic partition, written after each landed batch.
-- On partition assignment the sink seeks here, so a replayed batch is skipped.
CREATE TABLE IF NOT EXISTS sink_offsets
(
    consumer_group  String,
    topic           String,
    partition       Int32,
    next_offset     Int64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (consumer_group, topic, partition);
