"""Read-only SQL for analysts: what runs, on which connections, within which limits.

`ingest.sql_guard` decides what may run and renders it; this module runs that text:
- on ClickHouse connections of its own, one per SQL thread, never the health check's, the sink's or
  the reports' (a long query holds its connection, so nothing else may wait behind it);
- at most SQL_MAX_CONCURRENCY at once (`QueryGate`), on threads of its own, never the event loop's
  default executor that /readyz and the key store use; a request that finds no free slot soon
  enough is refused with 429 and Retry-After;
- bounded in rows (SQL_MAX_ROWS) and in bytes (SQL_MAX_RESULT_BYTES, counted on the JSON rows as the
  blocks stream in and stopped at once, so neither the API's memory nor the body grows past it), in
  time and in memory (ClickHouse's max_execution_time and max_memory_usage, which also bound the one
  block in flight);
- with readonly=1 on each query, or in server mode as the analyst user, whose settings profile holds
  readonly and the limits and who may only SELECT the ledger (`spendledger.platform.clickhouse.analyst_statements`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

import orjson

from ingest.errors import ApiError, InvalidQuery, QueryLimitExceeded, RateLimited, StorageUnavailableError
from ingest.sql_guard import PRIVATE_TABLES, Statement, check_explained, check_query
from schemas.clickhouse import BUDGET_KEYS_SQL, SPEND_TIME_SQL
from spendledger.platform.clickhouse import quoted_slices

if TYPE_CHECKING:
    from spendledger.platform.settings import ApiSettings

# ClickHouse error codes that mean "a limit was hit", with what the caller can do about it.
_LIMITS = {
    "158": "the query reads more rows than allowed",
    "159": "the query ran longer than SQL_MAX_SECONDS",
    "160": "the query ran too slowly to finish within SQL_MAX_SECONDS",
    "241": "the query needed more memory than SQL_MAX_MEMORY_BYTES",
    "396": "the result is over SQL_MAX_ROWS or SQL_MAX_RESULT_BYTES: aggregate, filter or add a LIMIT",
}


@dataclass(frozen=True)
class QueryLimits:
    max_rows: int
    max_seconds: int
    max_memory_bytes: int
    max_result_bytes: int = 16 * 1024**2

    @classmethod
    def of(cls, settings: ApiSettings) -> QueryLimits:
        return cls(
            settings.sql_max_rows,
            settings.sql_max_seconds,
            settings.sql_max_memory_bytes,
            settings.sql_max_result_bytes,
        )

    def settings(self) -> dict[str, str]:
        return {
            "readonly": "1",
            "max_result_rows": str(self.max_rows),
            # ClickHouse counts a block's bytes in memory (a constant column once): an early stop only;
            # the bound itself is counted on the JSON rows (`_collect`).
            "max_result_bytes": str(2 * self.max_result_bytes),
            "result_overflow_mode": "throw",
            "max_execution_time": str(self.max_seconds),
            "max_memory_usage": str(self.max_memory_bytes),
        }


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


def to_json_value(value: Any) -> Any:
    """Exact JSON for ClickHouse values: Decimal as a string, times ISO-8601 in UTC."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")  # plain notation, never 1.23E-10
    if isinstance(value, datetime):
        return value.isoformat() if value.tzinfo else value.isoformat() + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (UUID, IPv4Address, IPv6Address)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return str(value)


class QueryEngine(Protocol):
    def query(self, sql: str, limits: QueryLimits) -> QueryResult: ...

    def ping(self) -> bool: ...


class ClickHouseQueryEngine:
    """Runs guarded queries; `client` answers the health check.

    With `connect`, each SQL thread opens a connection of its own (and a fresh one after a failure:
    chDB can leave a failed query's rows on its handle for the next query). Without it, the queries
    share `client`, one at a time. `per_query_limits` is False where the server's settings profile
    holds readonly and the limits (the analyst user may change no setting). `unavailable` says why
    this instance runs no SQL at all (503).
    """

    def __init__(
        self,
        client: Any,
        *,
        connect: Callable[[], Any] | None = None,
        database: str | None = None,
        per_query_limits: bool = True,
        unavailable: str | None = None,
    ) -> None:
        self._client = client
        self._connect = connect
        self._database: str = database or client.database
        self._per_query_limits = per_query_limits
        self._unavailable = unavailable
        self._shared = threading.Lock()
        self._local = threading.local()

    def query(self, sql: str, limits: QueryLimits) -> QueryResult:
        if self._unavailable is not None:
            raise StorageUnavailableError(self._unavailable)
        statement = check_query(sql, self._database)
        if self._connect is None:
            with self._shared:
                return self._run(self._client, statement, limits)
        client = getattr(self._local, "client", None) or self._open(self._connect)
        try:
            return self._run(client, statement, limits)
        except Exception:
            self._local.client = None
            _close(client)
            raise

    def _open(self, connect: Callable[[], Any]) -> Any:
        try:
            client = connect()
        except Exception as exc:  # the platform's StorageUnavailable, or the driver's own
            raise StorageUnavailableError(f"cannot open a ClickHouse connection for SQL: {exc}") from exc
        self._local.client = client
        return client

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # any failure means "not reachable"
            return False

    def _run(self, client: Any, statement: Statement, limits: QueryLimits) -> QueryResult:
        try:
            if statement.kind == "select":
                # ClickHouse's own reading of the text that will run, checked by the same rules.
                ast = client.query(f"EXPLAIN AST {statement.sql}").result_rows
                check_explained([str(row[0]) for row in ast], self._database)
            settings = limits.settings() if self._per_query_limits else {}
            if statement.kind != "select":  # SHOW TABLES, DESCRIBE: a few rows, which chDB cannot stream
                result = client.query(statement.sql, settings=settings)
                rows = _rows([result.result_rows], limits)
                if statement.kind == "tables":
                    rows = [row for row in rows if row[0] not in PRIVATE_TABLES]
                return QueryResult(list(result.column_names), rows)
            with client.query_row_block_stream(statement.sql, settings=settings) as stream:
                rows = _rows(stream, limits)
                return QueryResult(list(stream.source.column_names), rows)
        except ApiError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc


class QueryGate:
    """At most `slots` queries at once, each on a thread of this gate's own pool. A request waits up to
    `wait_s` for a free slot, then gets 429. A slot is free when its thread is, even if the request
    that started it has gone. `close` ends the pool; the next query (an app served again) starts
    another."""

    def __init__(self, engine: QueryEngine, slots: int, wait_s: float) -> None:
        self._engine = engine
        self._slots = slots
        self._wait_s = wait_s
        self._pool: ThreadPoolExecutor | None = None
        self._free: asyncio.Semaphore | None = None

    async def run(self, sql: str, limits: QueryLimits) -> QueryResult:
        if self._pool is None or self._free is None:
            self._pool = ThreadPoolExecutor(max_workers=self._slots, thread_name_prefix="sql")
            self._free = asyncio.Semaphore(self._slots)
        pool, free = self._pool, self._free
        try:
            await asyncio.wait_for(free.acquire(), self._wait_s)
        except TimeoutError:
            raise RateLimited(
                f"{self._slots} SQL queries are already running (SQL_MAX_CONCURRENCY); retry shortly",
                {"limit_queries": self._slots},
                retry_after_s=max(1, math.ceil(self._wait_s)),
            ) from None
        loop = asyncio.get_running_loop()
        future: Future[QueryResult] = pool.submit(self._engine.query, sql, limits)
        future.add_done_callback(lambda _: _call_soon(loop, free.release))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        pool, self._pool, self._free = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _rows(blocks: Iterable[Sequence[Sequence[Any]]], limits: QueryLimits) -> list[list[Any]]:
    """The rows as JSON values, stopped at the first row past either bound (one block may already be
    in memory: ClickHouse's memory limit bounds it)."""
    rows: list[list[Any]] = []
    size = 2  # the brackets
    for block in blocks:
        for row in block:
            converted = [to_json_value(v) for v in row]
            size += _json_size(converted) + 1
            if size > limits.max_result_bytes:
                raise QueryLimitExceeded(
                    f"the result is larger than {limits.max_result_bytes} bytes as JSON (SQL_MAX_RESULT_BYTES): "
                    "select fewer or shorter columns, aggregate, or add a LIMIT",
                    {"limit_bytes": limits.max_result_bytes},
                )
            rows.append(converted)
            if len(rows) > limits.max_rows:
                raise QueryLimitExceeded(
                    f"the result has more than {limits.max_rows} rows (SQL_MAX_ROWS): aggregate, filter or add a LIMIT",
                    {"limit_rows": limits.max_rows},
                )
    return rows


def _json_size(row: list[Any]) -> int:
    try:
        return len(orjson.dumps(row))
    except orjson.JSONEncodeError:  # integers past 64 bits
        return len(json.dumps(row, default=str))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop has closed: nothing waits for the slot any more
        pass


def _close(client: Any) -> None:
    with contextlib.suppress(Exception):  # a broken connection may not close cleanly; it is dropped anyway
        client.close()


def _translate(exc: Exception) -> Exception:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = re.search(r"Code: (\d+)", message)
    code = match.group(1) if match else ""
    if code in _LIMITS:
        return QueryLimitExceeded(f"{_LIMITS[code]} ({message})")
    if code:
        return InvalidQuery(message)
    return StorageUnavailableError(f"ClickHouse query failed: {message}")


class ClickHouseSpendReader:
    """Spend per tag and window, straight from `spend_records` (what the ledger holds)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal:
        try:
            # The budget's own rule: its keys (tags, model, provider) at the time each call was received.
            result = self._client.query(
                f"SELECT sum(cost_usd) FROM spend_records WHERE {SPEND_TIME_SQL} >= %(start)s "  # noqa: S608
                f"AND {SPEND_TIME_SQL} < %(end)s AND has({BUDGET_KEYS_SQL}, %(tag)s)",
                parameters={"tag": tag, "start": start, "end": end},
            )
        except Exception as exc:
            raise _translate(exc) from exc
        value = result.result_rows[0][0] if result.result_rows else None
        return Decimal(value) if value is not None else Decimal(0)

    def spends(
        self, windows: Sequence[tuple[str, datetime, datetime]]
    ) -> dict[tuple[str, datetime, datetime], Decimal]:
        """`spend` of each (tag, start, end), in one scan per slice of tags (a listing asks for every
        budget at once: one query per budget took a minute for a few thousand)."""
        distinct = list(dict.fromkeys(windows))
        spans = list(dict.fromkeys((start, end) for _tag, start, end in distinct))
        sums: dict[tuple[str, int], Decimal] = {}
        for tags in quoted_slices(sorted({tag for tag, _start, _end in distinct})):
            sql, parameters = spends_query(tags, spans)
            try:
                result = self._client.query(sql, parameters=parameters)
            except Exception as exc:
                raise _translate(exc) from exc
            for key, *values in result.result_rows:
                sums |= {(key, j): Decimal(value) for j, value in enumerate(values) if value is not None}
        span_of = {span: j for j, span in enumerate(spans)}
        return {w: sums.get((w[0], span_of[(w[1], w[2])]), Decimal(0)) for w in distinct}

    def app_name(self, app_id: str) -> str:
        try:
            result = self._client.query(
                "SELECT argMax(app_name, occurred_at) FROM spend_records WHERE app_id = %(app)s AND app_name != ''",
                parameters={"app": app_id},
            )
        except Exception as exc:
            raise _translate(exc) from exc
        return str(result.result_rows[0][0]) if result.result_rows else ""


def spends_query(
    tags: Sequence[str], spans: Sequence[tuple[datetime, datetime]]
) -> tuple[str, dict[str, Any]]:
    """One scan of `spend_records`: a row per tag, `key, sum_0, sum_1, ...`, the spend of that tag in each
    [start, end) of `spans`, counted as `ClickHouseSpendReader.spend` counts it (a record once per key,
    its keys as a budget sees them, at the time it was received). A tag without spend has no row.
    The keys are matched with IN (a hash set), so the cost grows with the records, not the budgets."""
    parameters: dict[str, Any] = {
        "tags": list(tags),
        "start": min(start for start, _end in spans),
        "end": max(end for _start, end in spans),
    }
    columns = []
    for j, (start, end) in enumerate(spans):
        parameters |= {f"start_{j}": start, f"end_{j}": end}
        columns.append(f"sumIf(cost_usd, spent_at >= %(start_{j})s AND spent_at < %(end_{j})s)")
    sql = (
        f"SELECT key, {', '.join(columns)} FROM (SELECT cost_usd, {SPEND_TIME_SQL} AS spent_at, "  # noqa: S608
        f"arrayDistinct({BUDGET_KEYS_SQL}) AS keys FROM spend_records "
        "WHERE spent_at >= %(start)s AND spent_at < %(end)s) ARRAY JOIN keys AS key "
        "WHERE key IN %(tags)s GROUP BY key"
    )
    return sql, parameters
