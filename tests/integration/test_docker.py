"""The production parts (official Kafka and ClickHouse images) via testcontainers.

Skipped, with the reason printed, where no Docker engine answers.
"""

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from schemas.records import AttributedRecord

pytestmark = [pytest.mark.integration, pytest.mark.docker]


def docker_engine_reason() -> str | None:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return None
    except Exception as exc:  # no client library, no socket, no daemon
        return f"no Docker engine answers ({type(exc).__name__}); the production-image tests need one"


@pytest.fixture(scope="module", autouse=True)
def _need_docker():
    reason = docker_engine_reason()
    if reason:
        print(f"SKIPPED docker tests: {reason}")
        pytest.skip(reason)


def test_clickhouse_server_migrate_and_land():
    from testcontainers.clickhouse import ClickHouseContainer

    from processors.sink import ClickHouseStore, Landing
    from spendledger.platform.clickhouse import connect, migrate
    from spendledger.platform.settings import Settings

    with ClickHouseContainer("clickhouse/clickhouse-server:24.8") as ch:
        dsn = f"http://{ch.username}:{ch.password}@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
        client = connect(Settings.model_validate({"clickhouse_dsn": dsn}))
        assert "001_spend_records.sql" in migrate(client)
        t = datetime(2026, 11, 22, tzinfo=UTC)
        record = AttributedRecord(
            event_id="e1", request_id="r1", occurred_at=t, received_at=t, cost_usd=Decimal("0.0045")
        )
        store = ClickHouseStore(client)
        store.land(Landing(records=[record], next_offsets={("t", 0): 1}), "g")
        assert store.existing_event_ids(["e1", "e2"], t, t) == {"e1"}
        assert client.query("SELECT sum(cost_usd) FROM spend_records").result_rows == [(Decimal("0.0045"),)]


def test_kafka_topics_and_acknowledged_publish():
    from testcontainers.kafka import KafkaContainer

    from ingest.publisher import KafkaPublisher
    from spendledger.platform.kafka import ensure_topics
    from spendledger.platform.settings import Settings

    with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka:
        settings = Settings.model_validate({"kafka_bootstrap": kafka.get_bootstrap_server()})
        assert settings.topics.raw in ensure_topics(settings)
        publisher = KafkaPublisher(settings.kafka_config(), timeout_s=10)
        asyncio.run(publisher.publish(settings.topics.raw, [(b"k", b"{}")]))
        publisher.close()
