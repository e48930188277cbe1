-- Budget definitions as they change (latest version per tag wins), and the
-- block / unblock / alert signals the budget agent emits.
CREATE TABLE IF NOT EXISTS tag_budgets
(
    tag               String,
    max_budget_usd    Nullable(Decimal(38, 12)),
    soft_budget_usd   Nullable(Decimal(38, 12)),
    budget_duration   String,
    alert_thresholds  Array(UInt8),
    deleted           UInt8,
    updated_at        DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY tag;

CREATE TABLE IF NOT EXISTS budget_events
(
    at               DateTime64(3, 'UTC'),
    tag              String,
    event_type       LowCardinality(String),
    threshold_pct    Nullable(UInt8),
    spend_usd        Decimal(38, 12),
    max_budget_usd   Nullable(Decimal(38, 12)),
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (tag, at);
