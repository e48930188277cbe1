"""Attribution for the events a block of code emits: `track_context(...)` and `@track(...)`.

The current attribution lives in a `contextvars.ContextVar`, so it follows the
code that set it: asyncio tasks copy it when they are created, a new thread
starts without it (use `propagate(fn)` to carry it into a pool), and nothing
set in one request is seen by another. Nesting merges: inner values override
outer ones key by key, and tags accumulate.

`@track` takes static values only. Its arguments are evaluated once, when the
function is defined; a value read per request (a user id) belongs in
`track_context`, inside the function.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

# The headers that carry attribution (ledger.tags.ATTRIBUTION_HEADER_PREFIXES; a test holds them equal).
ATTRIBUTION_HEADER_PREFIXES = ("x-anyapi-", "xproxy-", "x-litellm-")

P = ParamSpec("P")
R = TypeVar("R")

Scalar = str | int | float


@dataclass(frozen=True)
class Attribution:
    """Who a call is for: flat fields (`user_id`, `team`, …), `key:value` tags, attribution headers, user."""

    fields: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None

    def merged(self, inner: Attribution) -> Attribution:
        """This attribution with `inner` laid over it (inner wins per key; tags accumulate)."""
        return Attribution(
            fields={**self.fields, **inner.fields},
            tags=self.tags + tuple(t for t in inner.tags if t not in self.tags),
            headers={**self.headers, **inner.headers},
            user=inner.user if inner.user is not None else self.user,
        )

    def event_fields(self) -> dict[str, Any]:
        """The attribution parts of a `POST /v1/events` event (`headers`, `metadata`, `user`)."""
        out: dict[str, Any] = {}
        if self.headers:
            out["headers"] = dict(self.headers)
        metadata: dict[str, Any] = dict(self.fields)
        if self.tags:
            metadata["tags"] = list(self.tags)
        if metadata:
            out["metadata"] = metadata
        if self.user is not None:
            out["user"] = self.user
        return out

    def __bool__(self) -> bool:
        return bool(self.fields or self.tags or self.headers or self.user is not None)


EMPTY = Attribution()
_current: contextvars.ContextVar[Attribution] = contextvars.ContextVar(
    "spendledger_attribution", default=EMPTY
)


def current_attribution() -> Attribution:
    """The attribution in effect here (empty outside any `track_context`)."""
    return _current.get()


def attribution_from(attribution: Mapping[str, Any]) -> Attribution:
    """Build an Attribution from keyword values; `tags` takes a list of `key:value` strings."""
    fields: dict[str, str] = {}
    tags: tuple[str, ...] = ()
    for key, value in attribution.items():
        if value is None:
            continue
        if key == "tags":
            tags = _tag_list(value)
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(f"attribution {key}= must be a string or a number, got {type(value).__name__}")
        else:
            fields[key] = str(value)
    return Attribution(fields=fields, tags=tags)


def _tag_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError('tags= takes a list of "key:value" strings')
    tags = tuple(value)
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f'tags= takes "key:value" strings, got {type(tag).__name__}')
    return tags


@contextmanager
def attribution_scope(attribution: Attribution) -> Iterator[Attribution]:
    """Lay `attribution` over the current one for the duration of the block."""
    effective = _current.get().merged(attribution)
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)


@contextmanager
def track_context(**attribution: Any) -> Iterator[Attribution]:
    """Attribute every event emitted inside the block, e.g. `with track_context(user_id=uid, team="support"):`.

    Values are strings or numbers (None is skipped); `tags=["feature:search"]`
    adds `key:value` tags. Works in sync and async code (`with`, also inside
    `async def`).
    """
    with attribution_scope(attribution_from(attribution)) as effective:
        yield effective


def track(**static_attribution: Scalar | list[str]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function (sync or async) so that its calls are attributed with these static values.

    The values are fixed when the module is loaded: pass literals such as
    `feature="summarize"`, never a function's result that should change per request.
    """
    for key, value in static_attribution.items():
        if callable(value):
            raise TypeError(
                f"@track({key}=...) got a callable; @track takes static values only. "
                "Use `with track_context(...)` for values known at run time."
            )
    scope = attribution_from(static_attribution)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError("@track does not wrap generators; use `with track_context(...)` inside them")
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with attribution_scope(scope):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with attribution_scope(scope):
                return fn(*args, **kwargs)

        return run

    return decorate


def propagate(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` bound to the current context, for a thread or an executor: `pool.submit(propagate(work), x)`."""
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(fn, *args, **kwargs)

    return run
