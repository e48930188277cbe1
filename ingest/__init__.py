"""HTTP ingest: events in, SQL out; Kafka publisher."""
