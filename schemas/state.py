"""The worker's stored state: the values of its changelog-backed tables (docs/architecture.md, "Formats").

Every stored value is a JSON object with its format's version in `v` (a value without one was written
by 0.1.0 before the field, in version 1). A value this code cannot read (a newer version, a broken key)
is never misread: the worker leaves it aside in its table, logs it and counts it
(`spendledger_worker_state_unreadable`), and goes on with the rest.

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
    if type(version) is not int or version != STATE_VERSION:
        raise StateFormatError(f"stored state of version {version!r}; this worker reads {STATE_VERSION}")
    return value


# Numeric parts after the tag, per kind: a tag may hold any character, NUL included, so a key is read
# from both ends.
_PARTS = {"s": 2, "m": 1, "d": 1, "r": 0, "t": 0}


def budget_key(kind: str, tag: str, *parts: int) -> str:
    return SEP.join([kind, tag, *map(str, parts)])


def read_budget_key(raw: bytes) -> tuple[str, str, list[int]]:
    """(kind, tag, parts) of a `budget-state` key, exactly as `budget_key` wrote it. Raises
    StateFormatError."""
    try:
        kind, *rest = raw.decode().split(SEP)
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"not a budget-state key: {raw[:80]!r}") from exc
    count = _PARTS.get(kind)
    if count is None or len(rest) < count + 1:
        raise StateFormatError(f"not a budget-state key: {raw[:80]!r}")
    split = len(rest) - count
    tag, parts = SEP.join(rest[:split]), rest[split:]
    if not all(part.isascii() and part.isdigit() and str(int(part)) == part for part in parts):
        raise StateFormatError(f"not a budget-state key: {raw[:80]!r}")
    return kind, tag, [int(part) for part in parts]
