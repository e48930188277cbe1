-- One row per call: the truth every report, rollup and budget reconciles to.
-- Money is Decimal(38, 12) (never Float); cost_usd is NULL when the model has no price.
CREATE TABLE IF NOT EXISTS spend_records
(
    event_id            String,
    request_id          String,
    occurred_at         DateTime64(3, 'UTC'),
    received_at         DateTime64(3, 'UTC'),
    landed_at           DateTime64(3, 'UTC') DEFAULT now64(3),
    app_id              LowCardinality(String),
    app_name            LowCardinality(String),
    app_version         LowCardinality(String),
    user_id             String,
    session_id          String,
    tenant_id           LowCardinality(String),
    team                LowCardinality(String),
    project             LowCardinality(String),
    environment         LowCardinality(String),
    feature             LowCardinality(String),
    region              LowCardinality(String),
    tags                Array(String),
    invalid_tags        Array(String),
    metadata            Map(String, String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    input_tokens        UInt64,
    output_tokens       UInt64,
    cache_read_tokens   UInt64,
    cache_write_tokens  UInt64,
    cost_usd            Nullable(Decimal(38, 12)),
    input_cost_usd      Nullable(Decimal(38, 12)),
    output_cost_usd     Nullable(Decimal(38, 12)),
    reported_cost_usd   Nullable(Decimal(38, 12)),
    price_source        LowCardinality(String),
    status              LowCardinality(String),
    http_status         Nullable(UInt16),
    latency_ms          Nullable(UInt32),
    join_kind           LowCardinality(String),
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (toDate(occurred_at), app_id, model, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
