-- Messages the pipeline could not process, with the reason: never a crash, never silently dropped.
CREATE TABLE IF NOT EXISTS spend_rejects
(
    rejected_at   DateTime64(3, 'UTC'),
    source_topic  LowCardinality(String),
    partition     Int32,
    offset        Int64,
    reason        String,
    payload       String,
    landed_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(rejected_at)
ORDER BY (rejected_at, source_topic, partition, offset)
SETTINGS non_replicated_deduplication_window = 1000;
