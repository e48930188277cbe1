"""The HTTP API: events in, SQL out, health and metrics (DESIGN §4, §10)."""

import asyncio
import collections
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ingest.analytics import ReportStore
from ingest.analytics import create_router as create_analytics_router
from ingest.budget_desk import BudgetServices, canonical_tag
from ingest.budgets import create_router
from ingest.errors import (
    FRAMEWORK_CODES,
    ApiError,
    BrokerUnavailableError,
    Draining,
    Forbidden,
    InvalidEvent,
    InvalidJson,
    InvalidKeyRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StorageUnavailableError,
    Unauthenticated,
    error_body,
    status_for,
)
from ingest.keys import KeyRing, KeyStore, RateLimiter, describe
from ingest.prepare import IngestPool, error_detail
from ingest.publisher import EventPublisher
from ingest.sql import QueryEngine, QueryGate, QueryLimits
from ledger.scopes import SCOPES, ApiKey, Binding, Permission, allows, scopes_allowed, valid_tag_pattern
from schemas.events import EventBatch, RawEvent
from spendledger.platform.errors import BrokerUnavailable
from spendledger.platform.settings import ApiSettings

log = logging.getLogger(__name__)


class AttributionProblem(BaseModel):
    reason: str
    input: str = Field(description="the tag or key concerned (cut at 80 characters)")
    message: str


class EventWarning(BaseModel):
    index: int = Field(description="position of the event in the request")
    event_id: str
    problems: list[AttributionProblem]


class AcceptedResponse(BaseModel):
    accepted: int
    event_ids: list[str]
    warnings: list[EventWarning] = Field(
        default_factory=list,
        description="attribution the ledger will not record (tags over a limit, bad keys, ...); the spend "
        "itself is counted",
    )


class SqlRequest(BaseModel):
    query: str = Field(min_length=1, max_length=20_000)  # checking 100 kB took seconds of CPU


class KeyCreate(BaseModel):
    """`POST /v1/keys`: a new key; apps, tenants and tags bind a producer key to what it may claim."""

    model_config = {"extra": "forbid"}

    scope: str = Field(description="producer, analyst or admin")
    name: str = Field(default="", max_length=200)
    apps: list[str] = Field(default_factory=list, max_length=100)
    tenants: list[str] = Field(default_factory=list, max_length=100)
    tags: list[str] = Field(
        default_factory=list, max_length=100, description="`key:value`, or `key:*` for every value of a key"
    )
    events_per_s: int = Field(
        default=0, ge=0, le=10_000_000, description="this key's rate limit; 0: the default"
    )


class SqlResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class Metrics:
    """Prometheus metrics of one API instance (own registry, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events_accepted = Counter(
            "spendledger_events_accepted", "Events acknowledged by Kafka", ["kind"], registry=self.registry
        )
        self.requests_rejected = Counter(
            "spendledger_api_errors", "API requests answered with an error", ["code"], registry=self.registry
        )
        self.publish_seconds = Histogram(
            "spendledger_publish_seconds",
            "Time from receipt to Kafka acknowledgement",
            registry=self.registry,
        )
        self.sql_seconds = Histogram("spendledger_sql_seconds", "SQL query time", registry=self.registry)
        self.check_seconds = Histogram(
            "spendledger_check_seconds",
            "/v1/check, from its request reaching the API to its answer sent",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )


@dataclass
class Services:
    """What the API needs from the outside world; swapped for twins in tests."""

    settings: ApiSettings
    publisher: EventPublisher
    queries: QueryEngine | None = None
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    budgets: BudgetServices | None = None
    reports: ReportStore | None = None
    # Processes that parse and check events (ingest.prepare); 0: a thread of the API's own.
    ingest_processes: int = 0
    # Keys created through /v1/keys (hashed); None: only the environment's keys.
    key_store: KeyStore | None = None
    # Set when the service stops: new events are refused (503, Retry-After) while what was
    # acknowledged drains; /readyz says so.
    draining: threading.Event = field(default_factory=threading.Event)
    # Why the service cannot make progress (e.g. the sink), for /readyz; None when it can.
    stuck: Callable[[], str | None] = lambda: None


def create_app(services: Services) -> FastAPI:
    settings = services.settings
    policy = settings.attribution_policy()
    keys = KeyRing(
        {
            "producer": settings.producer_key_list(),
            "analyst": settings.analyst_key_list(),
            "admin": settings.admin_key_list(),
        },
        services.key_store,
        settings.keys_refresh_s,
    ).start()
    services.on_shutdown.append(keys.stop)
    rate_limiter = RateLimiter(settings.key_events_per_s)
    pool = IngestPool(services.ingest_processes)
    services.on_shutdown.append(pool.close)
    limits = QueryLimits.of(settings)
    metrics = services.metrics
    # SQL runs on a pool of its own, at most SQL_MAX_CONCURRENCY at once; the event loop never waits for it.
    sql_gate = (
        QueryGate(services.queries, settings.sql_max_concurrency, wait_s=2.0)
        if services.queries is not None
        else None
    )
    if sql_gate is not None:
        services.on_shutdown.append(sql_gate.close)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if services.ingest_processes:
            await asyncio.to_thread(pool.start)
        yield
        for close in reversed(services.on_shutdown):
            close()
        services.publisher.close()

    app = FastAPI(
        title="Spend ledger API",
        version="0.1.0",
        description="Events in (202 after Kafka acknowledged), read-only SQL out. Errors: "
        '`{"error": {"code", "message", "details"}}`.',
        lifespan=lifespan,
    )

    app.add_middleware(Door, limit=settings.max_body_bytes, check_seconds=metrics.check_seconds)

    def authenticate(request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
        key = keys.find(token.strip())
        if key is None:
            raise Unauthenticated("unknown or revoked API key")
        return key

    def require(permission: Permission) -> Callable[[ApiKey], ApiKey]:
        def check(key: Annotated[ApiKey, Depends(authenticate)]) -> ApiKey:
            if not allows(key.scope, permission):
                needed = " or ".join(scopes_allowed(permission))
                raise Forbidden(f"this endpoint needs a {needed} key; this is a {key.scope} key")
            return key

        return check

    require_send, require_check = require("send"), require("check")
    require_read, require_manage = require("read"), require("manage")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.requests_rejected.labels(exc.code).inc()
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_for(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            # A body that is not JSON at all: 400, as /v1/events answers it.
            metrics.requests_rejected.labels(InvalidJson.code).inc()
            return JSONResponse(error_body(InvalidJson.code, "the body is not valid JSON"), 400)
        metrics.requests_rejected.labels(InvalidEvent.code).inc()
        details = [error_detail(e) for e in errors]
        return JSONResponse(error_body("invalid_request", "the request breaks the schema", details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (unknown path, wrong method, a body it cannot parse) in our shape.
        code = FRAMEWORK_CODES.get(exc.status_code, "bad_request")
        metrics.requests_rejected.labels(code).inc()
        message = (
            exc.detail if isinstance(exc.detail, str) and len(exc.detail) >= 10 else code.replace("_", " ")
        )
        return JSONResponse(error_body(code, message), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", extra={"error_type": type(exc).__name__})
        metrics.requests_rejected.labels("internal_error").inc()
        return JSONResponse(error_body("internal_error", "unexpected error; it has been logged"), 500)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=AcceptedResponse,
        responses={413: {}, 422: {}, 503: {}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/RawEvent"},
                                {"$ref": "#/components/schemas/EventBatch"},
                            ]
                        }
                    }
                },
            }
        },
    )
    async def post_events(
        request: Request,
        key: Annotated[ApiKey, Depends(require_send)],
        warnings: Annotated[
            bool,
            Query(
                description="list the attribution the ledger will not record (about a quarter of ingest's CPU "
                "per event; `false` for high-volume producers that do not read the answer)"
            ),
        ] = True,
    ) -> AcceptedResponse:
        """One event, or `{"events": [...]}` (up to 1000). 202 only after Kafka acknowledged every event."""
        started = time.perf_counter()
        if services.draining.is_set():
            raise Draining(
                "the ledger is stopping; nothing was acknowledged, retry with the same event ids",
                retry_after_s=settings.retry_after_s,
            )
        wait_s = rate_limiter.admit(key)
        if wait_s > 0:
            limit = rate_limiter.limit_of(key)
            raise RateLimited(
                f"this key may send {limit:g} events per second; "
                "nothing was acknowledged, retry later with the same event ids",
                {"limit_events_per_s": limit},
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        body = await _read_body(request, settings.max_body_bytes)
        received_at = datetime.now(UTC)
        try:
            partitions = await services.publisher.partition_count(settings.topics.raw)
        except BrokerUnavailable:
            partitions = None  # one message per event; the publish below says whether Kafka is back
        try:
            prepared = await pool.run(
                body,
                received_at=received_at,
                max_future_skew_s=settings.max_future_skew_s,
                binding=key.binding,
                policy=policy,
                partitions=partitions,
                max_event_bytes=settings.max_event_bytes,
                warnings=warnings,
                key_id=key.key_id,
            )
        except ApiError:
            rate_limiter.charge(key, max(1, body.count(b'"kind"')))  # a refused body costs its events too
            raise
        rate_limiter.charge(key, len(prepared.event_ids))
        try:
            await services.publisher.publish(settings.topics.raw, prepared.messages)
        except BrokerUnavailable as exc:
            raise BrokerUnavailableError(
                f"{exc}; nothing was acknowledged, retry with the same event ids",
                {"event_ids": prepared.event_ids},
                retry_after_s=settings.retry_after_s,
            ) from exc
        metrics.publish_seconds.observe(time.perf_counter() - started)
        # One labelled increment per kind, not per event (a lock and a look-up each).
        for kind, n in collections.Counter(prepared.kinds).items():
            metrics.events_accepted.labels(kind).inc(n)
        answer = {
            "accepted": len(prepared.event_ids),
            "event_ids": prepared.event_ids,
            "warnings": prepared.warnings,
        }
        return Response(orjson.dumps(answer), status_code=202, media_type="application/json")  # type: ignore[return-value]

    @app.post("/v1/sql", response_model=SqlResponse)
    async def post_sql(body: SqlRequest, _: Annotated[ApiKey, Depends(require_read)]) -> SqlResponse:
        """One SELECT over the ledger's tables (or SHOW TABLES, DESCRIBE <table>), checked on a parsed tree,
        with row, byte, time and memory limits."""
        if sql_gate is None:
            raise StorageUnavailableError("this API instance has no ClickHouse connection")
        started = time.perf_counter()
        result = await sql_gate.run(body.query, limits)
        metrics.sql_seconds.observe(time.perf_counter() - started)
        return SqlResponse(columns=result.columns, rows=result.rows)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: Kafka and ClickHouse reachable."""
        kafka = await services.publisher.ready()
        clickhouse = services.queries is not None and await asyncio.to_thread(services.queries.ping)
        budgets = services.budgets is None or (
            services.budgets.registry.staleness_s is not None
            and services.budgets.guard.staleness_s is not None
        )
        stuck = services.stuck()
        draining = services.draining.is_set()
        ready = kafka and clickhouse and budgets and stuck is None and not draining
        body: dict[str, Any] = {
            "status": "ready" if ready else "draining" if draining else "not_ready",
            "kafka": kafka,
            "clickhouse": clickhouse,
            "budgets": budgets,
        }
        if stuck is not None:
            body["stuck"] = stuck
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/ui", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """The dashboard: one static page that reads the reports API with an admin key."""
        return HTMLResponse(
            _dashboard_html(),
            headers={
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
        )

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics: open to loopback clients; others need an analyst or admin key
        (unless `METRICS_PUBLIC`)."""
        client = request.client.host if request.client else ""
        if not settings.metrics_public and client not in ("127.0.0.1", "::1"):
            require_read(authenticate(request))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/keys", status_code=201, responses={403: {}, 422: {}})
    async def create_key(body: KeyCreate, _: Annotated[ApiKey, Depends(require_manage)]) -> dict[str, Any]:
        """Create a key. The answer is the only time the key is shown; only its hash is stored."""
        if body.scope not in SCOPES:
            raise InvalidKeyRequest(f"scope must be one of {list(SCOPES)}", {"field": "scope"})
        if (body.apps or body.tenants or body.tags) and body.scope != "producer":
            raise InvalidKeyRequest(
                "only producer keys can be bound to apps, tenants or tags", {"field": "scope"}
            )
        bad = [t for t in body.tags if not valid_tag_pattern(t)]
        if bad:
            raise InvalidKeyRequest(f"tags must be `key:value` or `key:*`; got {bad[:3]}", {"field": "tags"})
        binding = Binding.of(body.apps, body.tenants, [_canonical_pattern(t, policy) for t in body.tags])
        if services.key_store is None:
            raise StorageUnavailableError("this API instance has no key store")
        new = ApiKey("", body.scope, body.name, binding, body.events_per_s)
        row, secret = await asyncio.to_thread(keys.create, new, datetime.now(UTC))
        log.info("api key created", extra={"key_id": row.key.key_id, "scope": row.key.scope})
        return {**describe(row), "key": secret}

    @app.get("/v1/keys")
    async def list_keys(_: Annotated[ApiKey, Depends(require_manage)]) -> dict[str, Any]:
        """Every key, never a secret or a hash."""
        await asyncio.to_thread(keys.refresh)
        return {"keys": keys.listing()}

    @app.post("/v1/keys/{key_id}/revoke", responses={404: {}})
    async def revoke_key(key_id: str, _: Annotated[ApiKey, Depends(require_manage)]) -> dict[str, Any]:
        """Revoke a key created through the API (environment keys are revoked by removing them)."""
        row = await asyncio.to_thread(keys.revoke, key_id, datetime.now(UTC))
        if row is None:
            raise NotFound(f"no key {key_id!r} was created through the API", {"key_id": key_id})
        log.info("api key revoked", extra={"key_id": key_id})
        return describe(row)

    if services.budgets is not None:
        app.include_router(
            create_router(
                services.budgets,
                services.publisher,
                settings.topics.budgets,
                require_manage=require_manage,
                require_read=require_read,
                require_check=require_check,
            )
        )

    if services.reports is not None:
        app.include_router(
            create_analytics_router(
                services.reports,
                require_read,
                coverage_dimensions=settings.coverage_dimensions.split(","),
                coverage_alert_pct=settings.coverage_alert_pct,
                max_groups=settings.report_max_groups,
            )
        )

    # Make RawEvent and EventBatch appear in the OpenAPI components for the oneOf above.
    _register_models(app, [RawEvent, EventBatch])
    return app


def _canonical_pattern(pattern: str, policy: Any) -> str:
    """A tag pattern as the ledger writes tags (`env:prod` -> `env:production`, `department:*` -> `team:*`)."""
    key, _, value = pattern.partition(":")
    try:
        tag = canonical_tag(f"{key}:{'x' if value == '*' else value}", policy)
    except ApiError as exc:
        raise InvalidKeyRequest(
            f"{pattern!r} is not a tag pattern: {exc.message}", {"field": "tags"}
        ) from exc
    return f"{tag.split(':', 1)[0]}:*" if value == "*" else tag


class Door:
    """Before a body is read or parsed: a POST without a key gets 401, one declaring a body over the
    limit 413 (FastAPI parses a route's JSON body before its key dependency runs)."""

    def __init__(self, app: Any, limit: int, check_seconds: Histogram) -> None:
        self.app = app
        self.limit = limit
        self.check_seconds = check_seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/check":
            started = time.perf_counter()
            try:
                await self._door(scope, receive, send)
            finally:
                self.check_seconds.observe(time.perf_counter() - started)
            return
        await self._door(scope, receive, send)

    async def _door(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length", b"")
            refusal: ApiError | None = None
            if not headers.get(b"authorization", b"").strip():
                refusal = Unauthenticated("send an API key as 'Authorization: Bearer <key>'")
            elif declared.isdigit() and int(declared) > self.limit:
                refusal = PayloadTooLarge(
                    f"the body is larger than {self.limit} bytes", {"limit_bytes": self.limit}
                )
            if refusal is not None:
                response = JSONResponse(
                    error_body(refusal.code, refusal.message, refusal.details), status_for(refusal)
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@functools.cache
def _dashboard_html() -> str:
    return resources.files("ingest").joinpath("ui/index.html").read_text(encoding="utf-8")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes", {"limit_bytes": limit})
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes", {"limit_bytes": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def _register_models(app: FastAPI, models: list[type[BaseModel]]) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components.setdefault(model.__name__, model_schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
