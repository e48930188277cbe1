"""A stopping API refuses new events (503, Retry-After) and says so on /readyz; a journaled publisher
acknowledges only what both Kafka and the disk hold."""

from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher, JournaledPublisher
from spendledger.platform.journal import Journal, read_segment, segments
from spendledger.platform.settings import Settings
from tests.component.test_api import PRODUCER, FakeQueries

EVENT = {"kind": "completed", "request_id": "r1", "event_id": "e1", "model": "openai/gpt-4o"}


def settings() -> Settings:
    return Settings.model_validate(
        {"producer_keys": "prod-key", "admin_keys": "admin-key", "retry_after_s": 7}
    )


async def test_a_draining_api_refuses_events_with_retry_after_and_publishes_nothing() -> None:
    publisher = InMemoryPublisher()
    services = Services(settings=settings(), publisher=publisher, queries=FakeQueries())
    app = create_app(services)
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.post("/v1/events", json=EVENT, headers=PRODUCER)).status_code == 202
        services.draining.set()
        r = await client.post("/v1/events", json=EVENT, headers=PRODUCER)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "7"
        assert r.json()["error"]["code"] == "draining"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert len(publisher.sent) == 1


async def test_readyz_says_why_a_stuck_part_stops_progress() -> None:
    services = Services(settings=settings(), publisher=InMemoryPublisher(), queries=FakeQueries())
    services.stuck = lambda: "sink: ClickHouse refuses inserts"
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as c:
        r = await c.get("/readyz")
    assert r.status_code == 503 and r.json()["stuck"] == "sink: ClickHouse refuses inserts"


async def test_a_journaled_publisher_keeps_what_it_acknowledged_on_disk(tmp_path: Path) -> None:
    inner = InMemoryPublisher()
    publisher = JournaledPublisher(inner, Journal(tmp_path))
    services = Services(settings=settings(), publisher=publisher, queries=FakeQueries())
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as c:
        assert (await c.post("/v1/events", json=EVENT, headers=PRODUCER)).status_code == 202
    publisher.journal.close()
    [(topic, key, value)] = [entry for path in segments(tmp_path) for entry in read_segment(path)]
    assert (topic, key) == ("spend.raw", b"r1") and inner.sent == [(topic, key, value)]


async def test_a_journal_that_cannot_write_is_a_503_and_nothing_is_acknowledged(tmp_path: Path) -> None:
    class FullDisk(Journal):
        def append(self, topic: str, messages: object) -> None:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    publisher = JournaledPublisher(InMemoryPublisher(), FullDisk(tmp_path))
    services = Services(settings=settings(), publisher=publisher, queries=FakeQueries())
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as c:
        r = await c.post("/v1/events", json=EVENT, headers=PRODUCER)
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert "No space left" in r.json()["error"]["message"]
    assert r.json()["error"]["details"]["event_ids"] == ["e1"]


@pytest.mark.parametrize("draining_first", [True, False])
def test_the_first_stop_signal_drains_and_a_second_stops_at_once(draining_first: bool) -> None:
    import threading

    import uvicorn

    from spendledger.services import draining_server

    draining = threading.Event()
    if draining_first:
        draining.set()  # `up` sent SIGUSR1 before its SIGTERM
    server = draining_server(uvicorn.Config(app=lambda *a: None), draining, grace_s=30)
    server.handle_exit(15, None)
    assert draining.is_set()
    assert server.should_exit is draining_first
    server.handle_exit(15, None)
    assert server.should_exit is True
