"""The worker's stored state: the values of its changelog-backed tables (docs/architecture.md, "Formats").

Every stored value is a JSON object with its format's version in `v` (a value without one was written
by 0.1.0 before the field, in version 1). A value of a newer
version than this code reads stops the worker with an error rather than being misread.

`pending-calls` (key: the request_id): a call's join state, ledger.join.PendingCall's fields.

`budget-state` (key: the kind, the tag and the kind's parts, joined by NUL), the account of a tag,
each value with its changelog partition in `p`:
    `s␀tag␀second␀n`  part n of a one-second bucket: `a` its amount, `i` the event ids counted in it
    `m␀tag␀minute`    a one-minute bucket's amount `a`; `d␀tag␀day` a one-day bucket's
    `r␀tag`           the budget: `def`, its schemas.budgets.BudgetDefinition
    `t␀tag`           the status: `w` the window [start_ms, end_ms], `spend`, `fired` thresholds,
                      `soft`, `blocked`, `end` (block end ms), `proj`, `max_ms`, `pending`
Money is a decimal string; times are epoch milliseconds.
"""

from __future__ import annotations

from typing import Any

import orjson

STATE_VERSION = 1
SEP = "\x00"


class StateFormatError(ValueError):
    """A stored value this code cannot read."""


def dump_state(fields: dict[str, Any]) -> bytes:
    """A stored value: the fields and the version. An exact-size copy: orjson's result
    keeps a 4 KiB allocation however short it is, which, kept in a table, multiplies its memory."""
    return bytes(memoryview(orjson.dumps({**fields, "v": STATE_VERSION})))


def load_state(raw: bytes) -> dict[str, Any]:
    """A stored value's fields, without `v`. Raises StateFormatError."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StateFormatError(f"stored state is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StateFormatError("stored state is not a JSON object")
    version = value.pop("v", 1)
    if version != STATE_VERSION:
        raise StateFormatError(f"stored state of version {version!r}; this worker reads {STATE_VERSION}")
    return value


def budget_key(kind: str, tag: str, *parts: int) -> str:
    return SEP.join([kind, tag, *map(str, parts)])


def read_budget_key(raw: bytes) -> tuple[str, str, list[int]]:
    """(kind, tag, parts) of a `budget-state` key. Raises StateFormatError."""
    kind, *rest = raw.decode().split(SEP)
    expected = {"s": 3, "m": 2, "d": 2, "r": 1, "t": 1}.get(kind)
    if expected is None or len(rest) != expected:
        raise StateFormatError(f"not a budget-state key: {raw[:80]!r}")
    try:
        return kind, rest[0], [int(part) for part in rest[1:]]
    except ValueError as exc:
        raise StateFormatError(f"not a budget-state key: {raw[:80]!r}") from exc


def tag_of_key(raw: bytes) -> str:
    return raw.decode().split(SEP)[1]
