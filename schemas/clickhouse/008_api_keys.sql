-- API keys created through /v1/keys: the SHA-256 of each key, never the key. A revocation is a
-- newer version of the row (read with FINAL).
CREATE TABLE IF NOT EXISTS api_keys
(
    key_id       String,
    key_hash     String,
    scope        LowCardinality(String),
    name         String,
    apps         Array(String),
    tenants      Array(String),
    tags         Array(String),
    events_per_s UInt32,
    created_at   DateTime64(3, 'UTC'),
    revoked_at   Nullable(DateTime64(3, 'UTC')),
    version      UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;
