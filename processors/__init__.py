"""Faust agents (join, attribute) and the ClickHouse sink."""
