"""Capture for the official `openai` and `anthropic` clients: one `completed` event per call.

`instrument(client, events)` wraps, on that client instance only:

| client | methods |
|---|---|
| `openai.OpenAI` / `AsyncOpenAI` | `chat.completions.create`, `responses.create`, `embeddings.create` |
| `anthropic.Anthropic` / `AsyncAnthropic` | `messages.create`, `messages.stream` |

Each call emits an event with the model, the provider's own usage object,
latency, status and the current attribution (`track_context`), and never a
prompt or a completion: the event is built from scratch, not from the request.

- **Streams** are recorded when they end: usage comes from the final chunk
  (for OpenAI chat, `stream_options.include_usage` is turned on, and the extra
  usage-only chunk is hidden from the caller unless they asked for it).
- **A stream closed before its end** (a `break`, `close()`, leaving a `with`,
  a cancelled task, or garbage collection) is recorded as `incomplete`, with
  the usage the provider had reported so far. Anthropic reports input tokens at
  the start; OpenAI reports nothing before the end, and then the ledger leaves
  the cost NULL (unknown), not zero.
- **A failed call** is recorded as `error` with its HTTP status, and the error
  is re-raised unchanged.
- Recording never raises into the caller.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spendledger.sdk.client import EventSink, completed_event
from spendledger.sdk.context import Attribution, attribution_from, current_attribution

log = logging.getLogger("spendledger.sdk")

# Set by the ASGI middleware for one request: how many calls were captured inside it.
_captured: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "spendledger_captured", default=None
)


@contextmanager
def capture_scope() -> Iterator[list[int]]:
    """Count the calls captured inside the block (`counter[0]`)."""
    counter = [0]
    token = _captured.set(counter)
    try:
        yield counter
    finally:
        _captured.reset(token)


class BudgetExceededError(Exception):
    """The budget guard refused the call before it was sent: a tag's budget is exhausted."""

    def __init__(self, decision: Any) -> None:
        self.decision = decision
        tags = ", ".join(s.tag for s in decision.blocked_by)
        super().__init__(f"budget exhausted for {tags}; retry after {decision.retry_after_s}s")


# ---------------------------------------------------------------- provider shapes


def _plain(value: Any) -> Any:
    """A provider SDK object (pydantic) as plain JSON data."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


@dataclass
class _Call:
    """One call in flight: what is known so far, recorded exactly once."""

    api: _Api
    events: EventSink
    attribution: Attribution
    model: str | None
    started_at: dt.datetime
    started: float
    usage: dict[str, Any] | None = None
    response_id: str | None = None
    status: str | None = None  # set when the stream says how it ended
    recorded: bool = False

    def observe_response(self, response: Any) -> None:
        self.model = getattr(response, "model", None) or self.model
        self.response_id = getattr(response, "id", None)
        usage = getattr(response, "usage", None)
        self.usage = _plain(usage) if usage is not None else None

    def record(self, status: str, http_status: int | None = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        try:
            event = completed_event(
                model=self.model,
                provider=self.api.provider,
                usage=self.usage,
                occurred_at=self.started_at,
                latency_ms=(time.perf_counter() - self.started) * 1000,
                status=status,
                http_status=http_status,
                attribution=self.attribution,
            )
            if self.response_id:
                event.setdefault("metadata", {})["provider_response_id"] = self.response_id
            self.events.emit(event)
            counter = _captured.get()
            if counter is not None:
                counter[0] += 1
        except Exception:
            log.exception("spendledger: could not record a call")


@dataclass(frozen=True)
class _Api:
    """How one provider method reports model, usage and the end of a stream."""

    provider: str
    observe_chunk: Callable[[_Call, Any], None]
    prepare: Callable[[dict[str, Any]], bool] = lambda kwargs: False  # True: a chunk must be hidden
    hidden: Callable[[Any], bool] = lambda chunk: False


def _openai_chat_chunk(call: _Call, chunk: Any) -> None:
    call.model = getattr(chunk, "model", None) or call.model
    call.response_id = getattr(chunk, "id", None) or call.response_id
    usage = getattr(chunk, "usage", None)
    if usage is not None:
        call.usage = _plain(usage)
        call.status = "success"  # the usage chunk is the last one


def _openai_chat_prepare(kwargs: dict[str, Any]) -> bool:
    """Turn on the final usage chunk of a stream; True when the caller did not ask for it (so hide it)."""
    if not kwargs.get("stream"):
        return False
    options = kwargs.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    if options.get("include_usage") is True:
        return False
    kwargs["stream_options"] = {**options, "include_usage": True}
    return True


def _openai_chat_hidden(chunk: Any) -> bool:
    return getattr(chunk, "usage", None) is not None and not getattr(chunk, "choices", None)


_RESPONSE_ENDS = {
    "response.completed": "success",
    "response.incomplete": "incomplete",
    "response.failed": "error",
}


def _openai_response_event(call: _Call, event: Any) -> None:
    ended = _RESPONSE_ENDS.get(getattr(event, "type", ""))
    response = getattr(event, "response", None)
    if response is not None:
        call.model = getattr(response, "model", None) or call.model
        call.response_id = getattr(response, "id", None) or call.response_id
    if ended is not None:
        usage = getattr(response, "usage", None)
        call.usage = _plain(usage) if usage is not None else call.usage
        call.status = ended


def _anthropic_event(call: _Call, event: Any) -> None:
    kind = getattr(event, "type", "")
    if kind == "message_start":
        message = event.message
        call.model = getattr(message, "model", None) or call.model
        call.response_id = getattr(message, "id", None)
        call.usage = _plain(message.usage)
    elif kind == "message_delta":
        # The delta's counts are cumulative; fields it leaves out keep their start values.
        delta = _plain(getattr(event, "usage", None)) or {}
        call.usage = {**(call.usage or {}), **{k: v for k, v in delta.items() if v is not None}}
    elif kind == "message_stop":
        call.status = "success"


OPENAI_CHAT = _Api("openai", _openai_chat_chunk, _openai_chat_prepare, _openai_chat_hidden)
OPENAI_RESPONSES = _Api("openai", _openai_response_event)
OPENAI_EMBEDDINGS = _Api("openai", lambda call, chunk: None)
ANTHROPIC_MESSAGES = _Api("anthropic", _anthropic_event)


# ---------------------------------------------------------------- streams


class _Observed:
    """A provider stream wrapped so its chunks are observed; attributes pass through to it."""

    def __init__(self, stream: Any, call: _Call, hide: bool) -> None:
        self._stream = stream
        self._call = call
        self._hide = hide

    def __getattr__(self, name: str) -> Any:
        stream = self.__dict__.get("_stream")
        if stream is None:
            raise AttributeError(name)
        return getattr(stream, name)

    def _take(self, chunk: Any) -> bool:
        """Observe a chunk; False when it must be hidden from the caller."""
        self._call.api.observe_chunk(self._call, chunk)
        return not (self._hide and self._call.api.hidden(chunk))

    def _ended(self, exc: BaseException | None = None) -> None:
        if exc is None:
            self._call.status = self._call.status or "success"
        _finish(self._call, exc)

    def __del__(self) -> None:
        # A stream dropped unread (garbage collected) is an incomplete call.
        call = self.__dict__.get("_call")
        if call is not None:
            _finish(call)


class _Stream(_Observed):
    """The provider's stream, observed: the same iteration, `with`, `close()` and attributes."""

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._stream)
            except StopIteration:
                self._ended()
                raise
            except BaseException as exc:
                self._ended(exc)
                raise
            if self._take(chunk):
                return chunk

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            _finish(self._call)


class _AsyncStream(_Observed):
    """The async provider stream, observed (see `_Stream`)."""

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                self._ended()
                raise
            except BaseException as exc:  # CancelledError included: the stream was cancelled
                self._ended(exc)
                raise
            if self._take(chunk):
                return chunk

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            _finish(self._call)


def _finish(call: _Call, exc: BaseException | None = None) -> None:
    """Record a stream's call: how it ended if the stream said so, else incomplete or error."""
    if call.recorded:
        return
    if call.status is not None:
        call.record(call.status, 200 if call.status == "success" else None)
    elif exc is None or isinstance(exc, (GeneratorExit, KeyboardInterrupt)) or _cancelled(exc):
        call.record("incomplete")
    else:
        call.record("error", getattr(exc, "status_code", None))


def _cancelled(exc: BaseException) -> bool:
    return type(exc).__name__ == "CancelledError"


# ---------------------------------------------------------------- wrapping


@dataclass(frozen=True)
class _Capture:
    events: EventSink
    defaults: Attribution
    guard: Any

    def start(self, api: _Api, kwargs: dict[str, Any]) -> _Call:
        attribution = self.defaults.merged(current_attribution())
        if self.guard is not None:
            decision = self.guard.check_request(**_guard_inputs(attribution))
            if not decision.allowed:
                raise BudgetExceededError(decision)
        model = kwargs.get("model")
        return _Call(
            api=api,
            events=self.events,
            attribution=attribution,
            model=model if isinstance(model, str) else None,
            started_at=dt.datetime.now(dt.UTC),
            started=time.perf_counter(),
        )

    def wrap(self, method: Callable[..., Any], api: _Api, is_async: bool) -> Callable[..., Any]:
        if getattr(method, "_spendledger_wrapped", False):
            return method
        if is_async:

            @functools.wraps(method)
            async def call_async(*args: Any, **kwargs: Any) -> Any:
                call = self.start(api, kwargs)
                hide = api.prepare(kwargs)
                try:
                    result = await method(*args, **kwargs)
                except BaseException as exc:
                    _finish(call, exc)
                    raise
                return self._result(call, result, hide, _AsyncStream)

            wrapped: Any = call_async
        else:

            @functools.wraps(method)
            def call_sync(*args: Any, **kwargs: Any) -> Any:
                call = self.start(api, kwargs)
                hide = api.prepare(kwargs)
                try:
                    result = method(*args, **kwargs)
                except BaseException as exc:
                    _finish(call, exc)
                    raise
                return self._result(call, result, hide, _Stream)

            wrapped = call_sync
        wrapped._spendledger_wrapped = True
        return wrapped

    @staticmethod
    def _result(call: _Call, result: Any, hide: bool, stream_type: type) -> Any:
        if _is_stream(result):
            return stream_type(result, call, hide)
        call.observe_response(result)
        call.record("success", 200)
        return result

    def wrap_stream_manager(self, method: Callable[..., Any], api: _Api) -> Callable[..., Any]:
        """Anthropic's `messages.stream(...)`: a manager whose stream reads a raw event stream."""
        if getattr(method, "_spendledger_wrapped", False):
            return method

        @functools.wraps(method)
        def stream(*args: Any, **kwargs: Any) -> Any:
            return _StreamManager(method(*args, **kwargs), self, api, kwargs)

        stream._spendledger_wrapped = True  # type: ignore[attr-defined]
        return stream


class _StreamManager:
    """Wraps Anthropic's `MessageStreamManager` / `AsyncMessageStreamManager`: observes the raw stream."""

    def __init__(self, manager: Any, capture: _Capture, api: _Api, kwargs: dict[str, Any]) -> None:
        self._manager = manager
        self._capture = capture
        self._api = api
        self._kwargs = kwargs
        self._call: _Call | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def _observe(self, stream: Any, stream_type: type) -> Any:
        raw = getattr(stream, "_raw_stream", None)
        if raw is not None and self._call is not None:
            stream._raw_stream = stream_type(raw, self._call, False)
        return stream

    def __enter__(self) -> Any:
        self._call = self._capture.start(self._api, self._kwargs)
        try:
            stream = self._manager.__enter__()
        except BaseException as exc:
            _finish(self._call, exc)
            raise
        return self._observe(stream, _Stream)

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self._manager.__exit__(*exc_info)
        finally:
            if self._call is not None:
                _finish(self._call, exc_info[1])

    async def __aenter__(self) -> Any:
        self._call = self._capture.start(self._api, self._kwargs)
        try:
            stream = await self._manager.__aenter__()
        except BaseException as exc:
            _finish(self._call, exc)
            raise
        return self._observe(stream, _AsyncStream)

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self._manager.__aexit__(*exc_info)
        finally:
            if self._call is not None:
                _finish(self._call, exc_info[1])


def _is_stream(result: Any) -> bool:
    module = type(result).__module__
    return type(result).__name__ in ("Stream", "AsyncStream") and module.split(".")[0] in (
        "openai",
        "anthropic",
    )


def _guard_inputs(attribution: Attribution) -> dict[str, Any]:
    event = attribution.event_fields()
    return {"headers": event.get("headers"), "metadata": event.get("metadata"), "user": event.get("user")}


def instrument(client: Any, events: EventSink, *, guard: Any = None, **attribution: Any) -> Any:
    """Capture every call of an `openai` or `anthropic` client (sync or async) to `events`; returns the client.

    `**attribution` are defaults for this client (e.g. `app_id="support-bot"`);
    `track_context` values override them. With `guard` (a `BudgetGuard`), a call
    whose tags are blocked raises `BudgetExceededError` before it is sent.
    """
    capture = _Capture(events, attribution_from(attribution), guard)
    family = type(client).__module__.split(".")[0]
    is_async = inspect.iscoroutinefunction(getattr(type(client), "close", None))
    if family == "openai":
        completions = client.chat.completions
        completions.create = capture.wrap(completions.create, OPENAI_CHAT, is_async)
        client.responses.create = capture.wrap(client.responses.create, OPENAI_RESPONSES, is_async)
        client.embeddings.create = capture.wrap(client.embeddings.create, OPENAI_EMBEDDINGS, is_async)
    elif family == "anthropic":
        messages = client.messages
        messages.create = capture.wrap(messages.create, ANTHROPIC_MESSAGES, is_async)
        messages.stream = capture.wrap_stream_manager(messages.stream, ANTHROPIC_MESSAGES)
    else:
        raise TypeError(f"instrument() takes an openai or anthropic client, got {type(client).__qualname__}")
    return client
