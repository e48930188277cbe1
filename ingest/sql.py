"""Read-only SQL for analysts: one statement, read-only, bounded in rows, time and memory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol
from uuid import UUID

from ingest.errors import InvalidQuery, QueryLimitExceeded, StorageUnavailableError

READ_ONLY_KEYWORDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*\n?|/\*.*?\*/)+", re.DOTALL)
# ClickHouse error codes that mean "a limit was hit".
_LIMIT_CODES = {"158", "159", "160", "241", "396"}


@dataclass(frozen=True)
class QueryLimits:
    max_rows: int
    max_seconds: int
    max_memory_bytes: int

    def settings(self) -> dict[str, str]:
        # readonly=1 also refuses table functions (file, url, remote, s3 …).
        return {
            "readonly": "1",
            "max_result_rows": str(self.max_rows),
            "result_overflow_mode": "throw",
            "max_execution_time": str(self.max_seconds),
            "max_memory_usage": str(self.max_memory_bytes),
        }


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


def check_read_only(sql: str) -> str:
    """Return the statement without a trailing `;`, or raise InvalidQuery for anything but one read."""
    stripped = _LEADING_COMMENTS.sub("", sql).strip()
    while stripped.endswith(";"):
        stripped = stripped[:-1].rstrip()
    if not stripped:
        raise InvalidQuery("the query is empty")
    if ";" in _without_literals(stripped):
        raise InvalidQuery("only one statement is allowed")
    first = stripped.split(None, 1)[0].upper()
    if first not in READ_ONLY_KEYWORDS:
        raise InvalidQuery(
            f"only read-only queries are allowed ({', '.join(READ_ONLY_KEYWORDS)}); got {first}",
            {"allowed": list(READ_ONLY_KEYWORDS)},
        )
    if re.search(r"\bFORMAT\s+\w+\s*$", _without_literals(stripped), re.IGNORECASE):
        raise InvalidQuery("FORMAT is chosen by the API; remove the FORMAT clause")
    return stripped


def other_database_in(sql: str, others: set[str]) -> str | None:
    """The first of `others` the query names (`db.table`, `FROM db`, `IN db`), or None.

    readonly=1 already refuses writes and table functions (file, url, remote…);
    this keeps analysts to the ledger's own tables, away from `system` and the rest.
    """
    text = _without_literals(sql)
    for db in sorted(others):
        name = re.escape(db)
        qualified = rf"(?<![\w.]){name}[`\"]?\s*\.|[`\"]{name}[`\"]\s*\."
        listed = rf"\b(FROM|IN|DATABASE)\s+[`\"]?{name}[`\"]?(?![\w.])"
        if re.search(qualified, text, re.IGNORECASE) or re.search(listed, text, re.IGNORECASE):
            return db
    return None


def _without_literals(sql: str) -> str:
    return re.sub(r"'(?:[^'\\]|\\.)*'", "''", sql)


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
    """Runs checked read-only queries with a client of its own (never the sink's)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._others: set[str] | None = None

    def _other_databases(self) -> set[str]:
        if self._others is None:
            own = getattr(self._client, "database", None)
            names = {str(row[0]) for row in self._client.query("SHOW DATABASES").result_rows}
            self._others = names - {own} | {"system", "information_schema", "INFORMATION_SCHEMA"}
        return self._others

    def query(self, sql: str, limits: QueryLimits) -> QueryResult:
        statement = check_read_only(sql)
        other = other_database_in(statement, self._other_databases())
        if other is not None:
            raise InvalidQuery(
                f"only the ledger's own tables can be read; the query names the database {other!r}"
            )
        try:
            # Settings ride as a SETTINGS clause on this one query; they never stick to the session.
            result = self._client.query(statement, settings=limits.settings())
        except Exception as exc:
            raise _translate(exc) from exc
        rows = [[to_json_value(v) for v in row] for row in result.result_rows]
        return QueryResult(columns=list(result.column_names), rows=rows)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # any failure means "not reachable"
            return False


def _translate(exc: Exception) -> Exception:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = re.search(r"Code: (\d+)", message)
    code = match.group(1) if match else ""
    if code in _LIMIT_CODES:
        return QueryLimitExceeded(message)
    if code:
        return InvalidQuery(message)
    return StorageUnavailableError(f"ClickHouse query failed: {message}")


class ClickHouseSpendReader:
    """Spend per tag and window, straight from `spend_records` (what the ledger holds)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal:
        try:
            result = self._client.query(
                "SELECT sum(cost_usd) FROM spend_records "
                "WHERE occurred_at >= %(start)s AND occurred_at < %(end)s AND has(tags, %(tag)s)",
                parameters={"tag": tag, "start": start, "end": end},
            )
        except Exception as exc:
            raise _translate(exc) from exc
        value = result.result_rows[0][0] if result.result_rows else None
        return Decimal(value) if value is not None else Decimal(0)

    def app_name(self, app_id: str) -> str:
        try:
            result = self._client.query(
                "SELECT argMax(app_name, occurred_at) FROM spend_records WHERE app_id = %(app)s AND app_name != ''",
                parameters={"app": app_id},
            )
        except Exception as exc:
            raise _translate(exc) from exc
        return str(result.result_rows[0][0]) if result.result_rows else ""
