"""The production processes: API (optionally hosting the sink), sink, migrate."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spendledger.clickhouse import connect, migrate
from spendledger.settings import Settings

log = logging.getLogger(__name__)


def build_sink(settings: Settings) -> Any:
    from processors.sink import ClickHouseStore, Sink

    client = connect(settings)
    migrate(client)
    return Sink(settings, ClickHouseStore(client))


def run_api(settings: Settings) -> None:
    """Serve the API with uvicorn; in embedded mode also host the sink (chDB allows one process)."""
    import uvicorn

    from ingest.analytics import ClickHouseReports
    from ingest.app import Services, create_app
    from ingest.publisher import KafkaPublisher
    from ingest.sql import ClickHouseQueryEngine

    client = connect(settings)
    migrate(client)
    services = Services(
        settings=settings,
        publisher=KafkaPublisher(settings.kafka_config(), timeout_s=settings.publish_timeout_s),
        queries=ClickHouseQueryEngine(client),
        budgets=build_budget_services(settings),
        reports=ClickHouseReports(connect(settings, create_database=False), settings.sql_max_seconds),
    )
    services.on_shutdown += [services.budgets.guard.stop, services.budgets.registry.stop]  # type: ignore[union-attr]
    if settings.embedded_sink:
        sink = build_sink(settings)
        thread = threading.Thread(target=sink.run, name="sink", daemon=True)
        thread.start()

        def stop_sink() -> None:
            sink.stop()
            thread.join(timeout=15)

        services.on_shutdown.append(stop_sink)
    uvicorn.run(
        create_app(services),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


def build_budget_services(settings: Settings) -> Any:
    """The API's views of `spend.budgets` and `spend.budget-blocks`, started, and its spend reader."""
    from zoneinfo import ZoneInfo

    from ingest.budgets import BudgetServices
    from ingest.sql import ClickHouseSpendReader
    from schemas.budgets import BudgetDefinition
    from spendledger.guard import BudgetGuard, CompactedView

    registry = CompactedView(
        settings.kafka_config(), settings.topics.budgets, BudgetDefinition.model_validate_json
    )
    guard = BudgetGuard.from_settings(settings)
    registry.start()
    guard.start()
    return BudgetServices(
        registry=registry,
        guard=guard,
        spend=ClickHouseSpendReader(connect(settings, create_database=False)),
        tz=ZoneInfo(settings.budget_timezone),
        policy=settings.attribution_policy(),
    )


def run_sink(settings: Settings) -> None:
    """The standalone sink, with /healthz, /readyz and /metrics on `sink_port`."""
    import signal

    sink = build_sink(settings)

    def status() -> tuple[int, bytes]:
        return (200, b'{"status":"ok"}') if sink.healthy else (503, b'{"status":"flush_failing"}')

    server = serve_health(settings.api_host, settings.sink_port, status)
    signal.signal(signal.SIGTERM, lambda *_: sink.stop())
    try:
        sink.run()
    except KeyboardInterrupt:
        sink.stop()
    finally:
        server.shutdown()


def serve_health(host: str, port: int, status: Any) -> ThreadingHTTPServer:
    """A tiny HTTP server for a process without an API: /healthz, /readyz, /metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                code, body, kind = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                code, body, kind = 200, b'{"status":"ok"}', "application/json"
            elif self.path == "/readyz":
                code, body = status()
                kind = "application/json"
            else:
                code, body, kind = 404, b'{"error":{"code":"not_found"}}', "application/json"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
