"""JSON responses where Decimals are numbers with all their digits (orjson cannot write Decimal)."""

from __future__ import annotations

import re
import secrets
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class ExactJSONResponse(JSONResponse):
    """JSON where Decimals are numbers with all their digits (orjson cannot write Decimal)."""

    def render(self, content: Any) -> bytes:
        return dumps_exact(content)


def dumps_exact(content: Any) -> bytes:
    numbers: list[str] = []
    # Each Decimal goes out as a marked string, then the number replaces it. The mark carries a nonce, so
    # no string of the content (a filter value, a tag) can pass for one.
    nonce = secrets.token_hex(8)
    mark = re.compile(rb'"\\u0000' + nonce.encode() + rb':(\d+)\\u0000"')

    def default(value: Any) -> Any:
        if isinstance(value, Decimal):
            numbers.append(format(value, "f"))
            return f"\x00{nonce}:{len(numbers) - 1}\x00"
        if isinstance(value, (datetime, date)):
            return value.isoformat()
        raise TypeError(f"cannot serialize {type(value).__name__}")

    raw = orjson.dumps(content, default=default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    return mark.sub(lambda m: numbers[int(m.group(1))].encode(), raw)
