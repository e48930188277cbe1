"""`SpendLedgerMiddleware`: budgets and spend events for a Python (ASGI) LLM gateway.

For each HTTP request it:

1. reads the attribution headers of DESIGN §4 (`X-AnyAPI-*`, `xProxy-*`,
   `x-litellm-*`; nothing else, so credentials never leave) and, for a JSON
   body up to `max_body_bytes`, the body's `model`, `user` and `metadata`;
2. asks the `BudgetGuard`; a blocked call is answered `429` with
   `Retry-After` and a JSON body naming the tags, and the app never sees it;
3. runs the app inside that attribution, so instrumented clients
   (`instrument(...)`) called by the app attribute their events to it;
4. when nothing inside captured the call, reads the app's response instead:
   a JSON body's `model` and `usage`, or the `usage` of a `text/event-stream`
   (OpenAI and Anthropic shapes), and emits one `completed` event. Error
   answers are emitted with their status, so success rates are right.

Prompts and completions are never sent: only the fields named above are read.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from spendledger.sdk.capture import capture_scope
from spendledger.sdk.client import EventSink, completed_event
from spendledger.sdk.context import ATTRIBUTION_HEADER_PREFIXES, Attribution, attribution_scope

log = logging.getLogger("spendledger.sdk")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_RESPONSE_SCAN_BYTES = 4 * 1024 * 1024


class SpendLedgerMiddleware:
    """ASGI middleware: `app = SpendLedgerMiddleware(app, guard=guard, events=client)`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        events: EventSink | None = None,
        guard: Any = None,
        path_prefixes: tuple[str, ...] = ("/",),
        provider: str | None = None,
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        self.app = app
        self.events = events
        self.guard = guard
        self.path_prefixes = path_prefixes
        self.provider = provider
        self.max_body_bytes = max_body_bytes
        self.blocked = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefixes):
            await self.app(scope, receive, send)
            return
        started_at, started = dt.datetime.now(dt.UTC), time.perf_counter()
        headers = _attribution_headers(scope)
        body, receive = await _read_json_body(scope, receive, self.max_body_bytes)
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        user = body.get("user") if isinstance(body.get("user"), (str, int)) else None

        if self.guard is not None:
            decision = self.guard.check_request(headers=headers, metadata=metadata, user=user)
            if not decision.allowed:
                self.blocked += 1
                await _send_blocked(send, decision)
                return

        attribution = Attribution(
            fields={k: str(v) for k, v in (metadata or {}).items() if _scalar(v)},
            tags=tuple(t for t in (metadata or {}).get("tags") or () if isinstance(t, str)),
            headers=headers,
            user=None if user is None else str(user),
        )
        response = _ResponseReader()

        async def observed_send(message: Message) -> None:
            response.observe(message)
            await send(message)

        with attribution_scope(attribution) as effective, capture_scope() as captured:
            try:
                await self.app(scope, receive, observed_send)
            finally:
                if self.events is not None and not captured[0]:
                    self._emit(effective, body, response, started_at, started)

    def _emit(
        self,
        attribution: Attribution,
        body: dict[str, Any],
        response: _ResponseReader,
        started_at: dt.datetime,
        started: float,
    ) -> None:
        """One event for a call nothing inside captured: from the response, else from the request."""
        assert self.events is not None  # noqa: S101 - checked by the caller
        try:
            model = response.model or (body.get("model") if isinstance(body.get("model"), str) else None)
            if model is None and response.usage is None:
                return  # not an LLM call (a health check, a model list)
            status = response.status or 500
            outcome = "success" if status < 400 else "error"
            if outcome == "success" and not response.finished:
                outcome = "incomplete"
            event = completed_event(
                model=model,
                provider=self.provider,
                usage=response.usage,
                occurred_at=started_at,
                latency_ms=(time.perf_counter() - started) * 1000,
                status=outcome,
                http_status=status,
                attribution=attribution,
            )
            if response.response_id:
                event.setdefault("metadata", {})["provider_response_id"] = response.response_id
            self.events.emit(event)
        except Exception:
            log.exception("spendledger: could not emit the gateway's event")


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _attribution_headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name = raw_name.decode("latin-1").lower()
        if name.startswith(ATTRIBUTION_HEADER_PREFIXES):
            out[name] = raw_value.decode("latin-1")
    return out


async def _read_json_body(scope: Scope, receive: Receive, limit: int) -> tuple[dict[str, Any], Receive]:
    """The request body parsed when it is JSON and small, and a `receive` that replays it to the app."""
    content_type = dict(scope.get("headers") or ()).get(b"content-type", b"")
    if scope.get("method") not in ("POST", "PUT", "PATCH") or b"json" not in content_type:
        return {}, receive
    chunks: list[bytes] = []
    size = 0
    more = True
    messages: list[Message] = []
    while more:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = message.get("more_body", False)
        if size > limit:
            break  # too large to parse here; pass it on untouched

    replay = list(messages)

    async def replaying_receive() -> Message:
        if replay:
            return replay.pop(0)
        return await receive()

    parsed: Any = {}
    if not more and size <= limit:
        try:
            parsed = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            parsed = {}
    return (parsed if isinstance(parsed, dict) else {}), replaying_receive


async def _send_blocked(send: Send, decision: Any) -> None:
    details = decision.to_dict()
    tags = [b["tag"] for b in details["blocked_by"]]
    retry_after = decision.retry_after_s
    payload = {
        "error": {
            "type": "budget_exceeded",
            "code": "budget_exceeded",
            "message": f"budget exhausted for {', '.join(tags)}; retry after {retry_after}s",
            "tags": tags,
            "retry_after_s": retry_after,
            "blocked_by": details["blocked_by"],
        }
    }
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _ResponseReader:
    """Reads `model`, `usage` and the response id off an LLM response as it streams past."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.response_id: str | None = None
        self.finished = False
        self._sse = False
        self._json = False
        self._buffer = b""
        self._scanned = 0

    def observe(self, message: Message) -> None:
        try:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
                content_type = dict(message.get("headers") or ()).get(b"content-type", b"")
                self._sse = b"text/event-stream" in content_type
                self._json = b"json" in content_type
            elif message["type"] == "http.response.body":
                self._body(message.get("body", b""), message.get("more_body", False))
        except Exception:
            log.debug("spendledger: could not read the response", exc_info=True)

    def _body(self, chunk: bytes, more: bool) -> None:
        self._scanned += len(chunk)
        if self._scanned > MAX_RESPONSE_SCAN_BYTES:
            self._buffer = b""
            self.finished = not more
            return
        if self._json:
            self._buffer += chunk
            if not more:
                parsed = json.loads(self._buffer or b"{}")
                if isinstance(parsed, dict):
                    self._take(parsed)
        elif self._sse:
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    self._sse_data(line[5:].strip())
        if not more:
            self.finished = True

    def _sse_data(self, data: bytes) -> None:
        if not data.startswith(b"{"):
            return  # "[DONE]"
        if self.model is not None and b'"usage"' not in data:
            return  # a content chunk: nothing left to learn from it, skip the parse
        event = json.loads(data)
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._take(event["message"])  # Anthropic: model, id, input usage
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            delta = {k: v for k, v in event["usage"].items() if v is not None}
            self.usage = {**(self.usage or {}), **delta}
        elif isinstance(event.get("response"), dict):
            self._take(event["response"])  # OpenAI Responses: response.completed
        else:
            self._take(event)  # OpenAI chat chunks; the last carries usage

    def _take(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
