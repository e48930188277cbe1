"""Dead-letter messages: a message that cannot be processed becomes data, with a reason."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from pydantic import ValidationError

MAX_PAYLOAD_CHARS = 65_536


def dead_letter(
    *, source_topic: str, partition: int, offset: int, reason: str, payload: bytes | None
) -> bytes:
    """The `spend.dead-letter` value for one rejected message."""
    text = (payload or b"").decode("utf-8", "replace")[:MAX_PAYLOAD_CHARS]
    return orjson.dumps(
        {
            "source_topic": source_topic,
            "partition": partition,
            "offset": offset,
            "reason": reason[:1000],
            "payload": text,
            "rejected_at": datetime.now(UTC).isoformat(),
        }
    )


def describe(exc: Exception) -> str:
    """A one-line reason for an exception (never the payload itself)."""
    if isinstance(exc, ValidationError) and exc.errors():
        # Its first line only counts the errors: name the first one's field and rule instead.
        errors = exc.errors(include_input=False, include_url=False)
        where = ".".join(str(p) for p in errors[0]["loc"]) or "value"
        rule = errors[0]["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"ValidationError: {where}: {rule}{more}"[:1000]
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:1000]
