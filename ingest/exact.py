"""JSON responses where Decimals are numbers with all their digits (orjson cannot write Decimal)."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class ExactJSONResponse(JSONResponse):
    """JSON where Decimals are numbers with all their digits (orjson cannot write Decimal)."""

    def render(self, content: Any) -> bytes:
        return dumps_exact(content)


_MARK = re.compile(rb'"\\u0000(\d+)\\u0000"')


def dumps_exact(content: Any) -> bytes:
    numbers: list[str] = []

    def default(value: Any) -> Any:
        if isinstance(value, Decimal):
            numbers.append(format(value, "f"))
            return f"\x00{len(numbers) - 1}\x00"
        if isinstance(value, (datetime, date)):
            return value.isoformat()
        raise TypeError(f"cannot serialize {type(value).__name__}")

    raw = orjson.dumps(content, default=default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    return _MARK.sub(lambda m: numbers[int(m.group(1))].encode(), raw)
