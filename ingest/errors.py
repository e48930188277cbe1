"""API errors: one hierarchy, each with a stable code; mapped to HTTP status in one place."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Root of the errors the API answers with `{"error": {"code", "message", "details"}}`."""

    code = "internal_error"

    def __init__(self, message: str, details: Any = None, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> Any:  # across a process boundary (ingest.prepare), with its details
        return _rebuild, (type(self), self.message, self.details, self.retry_after_s)


def _rebuild(cls: type[ApiError], message: str, details: Any, retry_after_s: int | None) -> ApiError:
    return cls(message, details, retry_after_s=retry_after_s)


class InvalidJson(ApiError):
    """The body is not JSON."""

    code = "invalid_json"


class InvalidEvent(ApiError):
    """The body is JSON but breaks the event schema."""

    code = "invalid_event"


class InvalidQuery(ApiError):
    """A SQL query that is not a single read-only statement, or that ClickHouse refused."""

    code = "invalid_query"


class Unauthenticated(ApiError):
    """No API key, or an unknown one."""

    code = "unauthenticated"


class Forbidden(ApiError):
    """A valid key without the scope this endpoint needs."""

    code = "forbidden"


class PayloadTooLarge(ApiError):
    """The body exceeds the size limit."""

    code = "payload_too_large"


class QueryLimitExceeded(ApiError):
    """A query hit its row, time or memory limit."""

    code = "query_limit_exceeded"


class BrokerUnavailableError(ApiError):
    """Kafka did not acknowledge: nothing is acknowledged, retry with the same event ids."""

    code = "broker_unavailable"


class Draining(ApiError):
    """The service is stopping: nothing was acknowledged, retry with the same event ids shortly."""

    code = "draining"


class StorageUnavailableError(ApiError):
    """ClickHouse cannot be reached."""

    code = "storage_unavailable"


class InvalidBudget(ApiError):
    """A budget or limit that breaks a rule (duration, amounts, thresholds, tag name)."""

    code = "invalid_budget"


class NotFound(ApiError):
    """The named budget, tag or app limit does not exist."""

    code = "not_found"


class Conflict(ApiError):
    """The budget already exists (use the update endpoint)."""

    code = "conflict"


class BudgetsUnavailable(ApiError):
    """The API has not yet read the budget topics (just started, or Kafka is unreachable)."""

    code = "budgets_unavailable"


class InvalidReport(ApiError):
    """A report request with a bad date range, an unknown group_by, metric or dimension."""

    code = "invalid_report"


class IngestUnavailable(ApiError):
    """The process that checks events stopped mid-request; retrying is safe."""

    code = "ingest_unavailable"


class RateLimited(ApiError):
    """A key sent more than its rate allows; `Retry-After` says when to send again."""

    code = "rate_limited"


class InvalidKeyRequest(ApiError):
    """A key to create with an unknown scope, a bad binding, or a binding on a non-producer key."""

    code = "invalid_key_request"


HTTP_STATUS: dict[type[ApiError], int] = {
    InvalidJson: 400,
    InvalidEvent: 422,
    InvalidQuery: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    PayloadTooLarge: 413,
    QueryLimitExceeded: 422,
    BrokerUnavailableError: 503,
    Draining: 503,
    StorageUnavailableError: 503,
    InvalidBudget: 422,
    NotFound: 404,
    Conflict: 409,
    BudgetsUnavailable: 503,
    InvalidReport: 400,
    RateLimited: 429,
    IngestUnavailable: 503,
    InvalidKeyRequest: 422,
}


# Codes for refusals the web framework makes itself, before our handlers run.
FRAMEWORK_CODES: dict[int, str] = {
    400: "invalid_json",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def status_for(error: ApiError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}
