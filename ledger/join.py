"""Joining a call's `request` and `usage` events, keyed by request_id.

A pure state machine: (state, event, now) -> (state, emitted call). The Faust
agent stores the state per request_id in a changelog-backed table and calls
`on_tick` from a timer.

- `completed` needs no join and is emitted at once.
- `request` then `usage` (or the reverse) -> one `joined` call.
- a request whose usage never comes -> `request_only` after `request_timeout_ms`
  (recorded with status `incomplete`).
- a usage with no request -> `usage_only` after `usage_wait_ms`, with the
  attribution it carries.
- after emitting, a `done` marker stays for `done_retention_ms` so a replayed or
  duplicated event of the same call changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

RawEventDict = dict[str, Any]


@dataclass(frozen=True)
class JoinTimeouts:
    request_timeout_ms: int = 600_000
    usage_wait_ms: int = 10_000
    done_retention_ms: int = 600_000


@dataclass
class PendingCall:
    """Join state of one request_id."""

    partition: int
    first_seen_ms: int
    request: RawEventDict | None = None
    usage: RawEventDict | None = None
    done_ms: int | None = None


@dataclass(frozen=True)
class JoinedCall:
    """A call ready to attribute: its request event and/or its usage (or completed) event."""

    request_id: str
    join_kind: str
    request: RawEventDict | None = None
    usage: RawEventDict | None = None

    def encode(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def decode(cls, data: bytes) -> JoinedCall:
        return cls(**orjson.loads(data))


@dataclass
class JoinStep:
    """The outcome of one step: the new state (None = forget), what to emit, and whether state changed."""

    state: PendingCall | None
    emitted: list[JoinedCall] = field(default_factory=list)
    changed: bool = False
    duplicate: bool = False


def on_event(state: PendingCall | None, event: RawEventDict, *, partition: int, now_ms: int) -> JoinStep:
    kind = event["kind"]
    request_id = event["request_id"]
    if kind == "completed":
        # No join needed; the sink's event_id check absorbs a replayed completed event.
        return JoinStep(state, [JoinedCall(request_id, "completed", usage=event)])
    if state is not None and state.done_ms is not None:
        return JoinStep(state, duplicate=True)
    if state is None:
        state = PendingCall(partition=partition, first_seen_ms=now_ms)
    if kind == "request":
        if state.request is not None:
            return JoinStep(state, duplicate=True)
        state.request = event
    else:
        if state.usage is not None:
            return JoinStep(state, duplicate=True)
        state.usage = event
    if state.request is not None and state.usage is not None:
        joined = JoinedCall(request_id, "joined", request=state.request, usage=state.usage)
        return JoinStep(_done(state, now_ms), [joined], changed=True)
    return JoinStep(state, changed=True)


def on_tick(state: PendingCall, *, now_ms: int, timeouts: JoinTimeouts) -> JoinStep:
    """Expire a pending call whose partner did not come, or forget an old done marker."""
    age = now_ms - state.first_seen_ms
    if state.done_ms is not None:
        if now_ms - state.done_ms >= timeouts.done_retention_ms:
            return JoinStep(None, changed=True)
        return JoinStep(state)
    if state.request is not None and age >= timeouts.request_timeout_ms:
        request_id = state.request["request_id"]
        return JoinStep(
            _done(state, now_ms), [JoinedCall(request_id, "request_only", request=state.request)], True
        )
    if state.usage is not None and state.request is None and age >= timeouts.usage_wait_ms:
        request_id = state.usage["request_id"]
        return JoinStep(_done(state, now_ms), [JoinedCall(request_id, "usage_only", usage=state.usage)], True)
    return JoinStep(state)


def next_tick_ms(state: PendingCall, timeouts: JoinTimeouts) -> int:
    """The first time at which `on_tick` changes this state (so a timer need not look at it before)."""
    if state.done_ms is not None:
        return state.done_ms + timeouts.done_retention_ms
    if state.request is not None:
        return state.first_seen_ms + timeouts.request_timeout_ms
    return state.first_seen_ms + timeouts.usage_wait_ms


def _done(state: PendingCall, now_ms: int) -> PendingCall:
    # The events themselves are dropped: the marker only has to say "already emitted".
    return PendingCall(partition=state.partition, first_seen_ms=state.first_seen_ms, done_ms=now_ms)
