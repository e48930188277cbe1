-- Rollups analysts can sum directly. spend_records stays the truth: these are
-- kept by materialized views, which count each row the sink lands once: rows
-- already landed are filtered by event_id, and a replayed batch carries the
-- same insert_deduplication_token, which the sink passes down to the views
-- (deduplicate_blocks_in_dependent_materialized_views); the rollup tables keep
-- a deduplication window for it. tests/component/test_rollups.py proves it.
-- SummingMergeTree folds rows in the background: always aggregate with sum()
-- and GROUP BY, never read a row as final.
-- Backfill from spend_records happens when a rollup is first created (see
-- spendledger/clickhouse.py); run `spendledger migrate` before the sinks.

-- Per UTC day x app x the one-value dimensions x model x status.
CREATE TABLE IF NOT EXISTS spend_daily
(
    day                 Date,
    app_id              LowCardinality(String),
    team                LowCardinality(String),
    environment         LowCardinality(String),
    feature             LowCardinality(String),
    project             LowCardinality(String),
    tenant_id           LowCardinality(String),
    region              LowCardinality(String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    status              LowCardinality(String),
    price_source        LowCardinality(String),
    app_name            SimpleAggregateFunction(max, String),
    requests            UInt64,
    input_tokens        UInt64,
    output_tokens       UInt64,
    cache_read_tokens   UInt64,
    cache_write_tokens  UInt64,
    cost_usd            Decimal(38, 12),
    unpriced_requests   UInt64,
    latency_ms_sum      UInt64,
    latency_count       UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, app_id, team, environment, feature, project, tenant_id, region, provider, model, status, price_source)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS spend_daily_mv TO spend_daily AS
SELECT
    toDate(occurred_at) AS day,
    app_id, team, environment, feature, project, tenant_id, region, provider, model, status, price_source,
    max(spend_records.app_name) AS app_name,
    count() AS requests,
    sum(spend_records.input_tokens) AS input_tokens,
    sum(spend_records.output_tokens) AS output_tokens,
    sum(spend_records.cache_read_tokens) AS cache_read_tokens,
    sum(spend_records.cache_write_tokens) AS cache_write_tokens,
    sum(ifNull(spend_records.cost_usd, toDecimal128(0, 12))) AS cost_usd,
    countIf(spend_records.cost_usd IS NULL) AS unpriced_requests,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    countIf(latency_ms IS NOT NULL) AS latency_count
FROM spend_records
GROUP BY day, app_id, team, environment, feature, project, tenant_id, region, provider, model, status, price_source;

-- Per UTC day x tag: a record counts once under each of its tags (a record's
-- tags are unique), so one tag's total never counts a record twice.
CREATE TABLE IF NOT EXISTS spend_daily_tags
(
    day                 Date,
    tag                 String,
    requests            UInt64,
    input_tokens        UInt64,
    output_tokens       UInt64,
    cost_usd            Decimal(38, 12),
    unpriced_requests   UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, tag)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS spend_daily_tags_mv TO spend_daily_tags AS
SELECT
    toDate(occurred_at) AS day,
    arrayJoin(tags) AS tag,
    count() AS requests,
    sum(spend_records.input_tokens) AS input_tokens,
    sum(spend_records.output_tokens) AS output_tokens,
    sum(ifNull(spend_records.cost_usd, toDecimal128(0, 12))) AS cost_usd,
    countIf(spend_records.cost_usd IS NULL) AS unpriced_requests
FROM spend_records
GROUP BY day, tag;
