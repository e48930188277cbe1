"""The bottom layer of the server: settings, Kafka and ClickHouse connections, the chDB relay, the
ingest journal, errors, logs and process tuning (docs/architecture.md, "Layers")."""
