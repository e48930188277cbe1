-- One row per attempt to deliver a budget alert to a destination (`spend.alert-deliveries`,
-- processors/alerts.py). A destination is named, never its URL. status: 'delivered' | 'retrying'
-- | 'failed'; attempt 0 is a delivery never tried (an unknown destination, an alert too old).
-- The sink lands a copy of an attempt once (it looks the attempt_id up); the replacing engine
-- folds any copy that still got in.
CREATE TABLE IF NOT EXISTS alert_deliveries
(
    at           DateTime64(3, 'UTC'),
    attempt_id   String,
    alert_id     String,
    tag          String,
    destination  LowCardinality(String),
    attempt      UInt8,
    status       LowCardinality(String),
    http_status  Nullable(UInt16),
    error        String,
    latency_ms   Nullable(UInt32),
    landed_at    DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_attempt_id attempt_id TYPE bloom_filter(0.001) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (alert_id, destination, attempt_id)
SETTINGS non_replicated_deduplication_window = 1000;
