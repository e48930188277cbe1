"""The production processes: API (optionally hosting the sink), sink, migrate."""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spendledger.platform.clickhouse import connect, migrate
from spendledger.platform.settings import ApiSettings, CommonSettings, SinkSettings

log = logging.getLogger(__name__)


def build_sink(settings: SinkSettings) -> Any:
    from processors.sink import ClickHouseStore, Sink

    client = connect(settings)
    if not settings.is_relayed_clickhouse:  # the engine's owner migrated it
        migrate(client)
    return Sink(settings, ClickHouseStore(client))


def build_query_engine(settings: ApiSettings, client: Any | None = None) -> Any:
    """The /v1/sql engine: `client` (or a new one) answers the health check; each SQL thread opens a
    connection of its own, as the analyst user against a server. Against a server without the analyst
    user's password it runs no SQL (503 saying so): the main user may write."""
    from ingest.sql import ClickHouseQueryEngine
    from spendledger.platform.clickhouse import connect_analyst

    health = client if client is not None else connect(settings, create_database=False)
    database = settings.clickhouse_database
    if not settings.is_embedded_clickhouse and settings.clickhouse_analyst_password is None:
        return ClickHouseQueryEngine(
            health,
            database=database,
            unavailable="SQL is off: set SPENDLEDGER_CLICKHOUSE_ANALYST_PASSWORD and run `spendledger migrate`, "
            "which creates the ClickHouse user that may only read the ledger",
        )
    return ClickHouseQueryEngine(
        health,
        connect=lambda: connect_analyst(settings),
        database=database,
        per_query_limits=settings.is_embedded_clickhouse,  # a server's analyst profile holds them
    )


def run_api(settings: ApiSettings) -> None:
    """Serve the API with uvicorn. With `CLICKHOUSE_RELAY` (the embedded system) it lends its chDB engine
    to the sink's process (chDB allows one process per data dir); with `EMBEDDED_SINK` it runs the sink
    as a thread of its own instead.

    SIGUSR1 starts draining (new events get 503 with Retry-After; `up` sends it before it waits
    for the pipeline to empty). SIGTERM drains for `api_drain_grace_s`, then stops.
    """
    import signal

    import uvicorn

    # Threads that hold the GIL under load (an EMBEDDED_SINK, the journal's pruner) hand it to the
    # event loop (and /v1/check) sooner with a short switch interval.
    sys.setswitchinterval(settings.api_switch_interval_s)
    draining = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: draining.set())  # first: `up` may drain a starting API

    from ingest.analytics import ClickHouseReports
    from ingest.app import Services, create_app
    from ingest.keys import ClickHouseKeyStore
    from ingest.publisher import EventPublisher, JournaledPublisher, KafkaPublisher
    from spendledger.platform.journal import Journal

    client = connect(settings)
    migrate(client)
    publisher: EventPublisher = KafkaPublisher(settings.kafka_config(), timeout_s=settings.publish_timeout_s)
    journal = Journal(settings.journal_dir) if settings.journal_dir is not None else None
    if journal is not None:
        publisher = JournaledPublisher(publisher, journal)
    services = Services(
        settings=settings,
        publisher=publisher,
        queries=build_query_engine(settings, client),
        budgets=build_budget_services(settings),
        reports=ClickHouseReports(connect(settings, create_database=False), settings.sql_max_seconds),
        key_store=ClickHouseKeyStore(connect(settings, create_database=False)),
        ingest_processes=settings.ingest_processes,
        draining=draining,
    )
    services.on_shutdown += [services.budgets.guard.stop, services.budgets.registry.stop]  # type: ignore[union-attr]
    relay = settings.clickhouse_relay
    if relay is not None:  # the embedded system's sink process lands through the API's engine
        from spendledger.platform.chdb_relay import RelayAddress, RelayServer

        server = RelayServer(
            connect(settings, create_database=False), RelayAddress.parse(relay.get_secret_value())
        )
        services.on_shutdown.insert(0, server.start().stop)  # shutdown runs the list backwards: last
    if journal is not None:
        # Whoever lands the records (a sink process, or the thread below), the API prunes what landed.
        pruner = JournalPruner(
            journal,
            connect(settings, create_database=False),
            settings,
            interval_s=settings.journal_prune_interval_s,
            settle_s=settings.journal_settle_s,
        )
        pruner.start()
        services.on_shutdown.append(pruner.stop)
    if settings.embedded_sink:
        sink = build_sink(settings)
        thread = threading.Thread(target=sink.run, name="sink", daemon=True)
        thread.start()
        services.stuck = lambda: getattr(sink, "stuck_reason", None)

        def stop_sink() -> None:
            sink.stop()
            thread.join(timeout=15)

        # Shutdown runs on_shutdown backwards: the sink lands its last batch, then the last pruning pass.
        services.on_shutdown.append(stop_sink)
    config = uvicorn.Config(
        create_app(services),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    draining_server(config, services.draining, settings.api_drain_grace_s).run()


def draining_server(config: Any, draining: threading.Event, grace_s: float) -> Any:
    """uvicorn's server, whose first SIGINT/SIGTERM refuses new events for `grace_s` before it stops
    (a load balancer sees /readyz fail and moves away); a signal while draining stops at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if draining.is_set() or grace_s <= 0 or self.should_exit:
                super().handle_exit(sig, frame)
                return
            draining.set()
            log.warning("draining: new events are refused", extra={"grace_s": grace_s})
            timer = threading.Timer(grace_s, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()

    return Server(config)


class JournalPruner:
    """Closes the journal's segment every `interval_s` and deletes a closed one once all it holds has
    landed, and stayed landed for `settle_s`: ClickHouse writes parts without fsync, so a row is on disk
    for sure only after the kernel's writeback (30 s by default) has run."""

    def __init__(
        self,
        journal: Any,
        client: Any,
        settings: CommonSettings,
        interval_s: float = 30.0,
        settle_s: float = 60.0,
    ) -> None:
        self.journal = journal
        self.client = client
        self.topics = settings.topics
        self.interval_s = interval_s
        self.settle_s = settle_s
        self._settled_at: dict[Any, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-pruner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.prune()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.journal.rotate(min_age_s=self.interval_s)
            self.prune()

    def prune(self) -> None:
        import time

        from spendledger.platform.journal import remove
        from spendledger.restore import settled_segments

        try:
            settled = settled_segments(self.client, self.journal.closed_segments(), self.topics)
        except Exception as exc:  # ClickHouse busy or down: the segments wait for the next pass
            log.warning("journal pruning failed", extra={"error": str(exc)})
            return
        now = time.monotonic()
        due = [path for path in settled if now - self._settled_at.setdefault(path, now) >= self.settle_s]
        remove(due)
        for path in due:
            del self._settled_at[path]
        if due:
            log.info("journal pruned", extra={"segments": len(due)})


def build_budget_services(settings: ApiSettings) -> Any:
    """The API's views of `spend.budgets` and `spend.budget-blocks`, started, and its spend reader."""
    from zoneinfo import ZoneInfo

    from ingest.budget_desk import BudgetServices
    from ingest.sql import ClickHouseSpendReader
    from ledger.pricing import PriceBook, parse_price_overrides
    from schemas.budgets import BudgetDefinition
    from spendledger.guard import BudgetGuard, CompactedView

    registry = CompactedView(
        settings.kafka_config(), settings.topics.budgets, BudgetDefinition.model_validate_json
    )
    # From the process's one Settings; a gateway's guard reads the same values through GuardSettings.
    guard = BudgetGuard(
        settings.kafka_config(), settings.topics.budget_blocks, policy=settings.attribution_policy()
    )
    registry.start()
    guard.start()
    return BudgetServices(
        registry=registry,
        guard=guard,
        spend=ClickHouseSpendReader(connect(settings, create_database=False)),
        tz=ZoneInfo(settings.budget_timezone),
        policy=settings.attribution_policy(),
        alert_destinations=frozenset(settings.alert_destinations),  # names only: the URLs stay in the worker
        prices=PriceBook(
            parse_price_overrides(settings.price_overrides_file.read_text(encoding="utf-8"))
            if settings.price_overrides_file
            else ()
        ),
    )


def run_sink(settings: SinkSettings) -> None:
    """The standalone sink, with /healthz, /readyz and /metrics on `sink_port`."""
    import signal

    sink = build_sink(settings)

    def status() -> tuple[int, bytes]:
        stuck = sink.stuck_reason
        if stuck is None and sink.healthy:
            return 200, b'{"status":"ok"}'
        return 503, json.dumps({"status": "flush_failing", "stuck": stuck}).encode()

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
