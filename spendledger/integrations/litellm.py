"""The LiteLLM proxy plugin: every call through the proxy lands in the ledger, and a call whose budget is
blocked is refused with 429 before the upstream is contacted (docs/integrations/litellm.md).

    # the proxy's config.yaml
    litellm_settings:
      callbacks: spendledger.integrations.litellm.handler

Read from the environment when the proxy loads the module:

- `SPENDLEDGER_URL`, `SPENDLEDGER_API_KEY` (a producer key): where events go. Required.
- `SPENDLEDGER_CHECK`: `on` (default) refuses blocked calls; `off` only records.
- `SPENDLEDGER_CHECK_TIMEOUT_S` (0.25): a check that takes longer lets the call go ahead; so does a
  ledger that does not answer, which is then not asked again for `SPENDLEDGER_CHECK_COOLDOWN_S` (5).
- `SPENDLEDGER_CHECK_CACHE_S` (1): how long one answer serves calls with the same attribution.
- `SPENDLEDGER_KAFKA_BOOTSTRAP`: read the blocks from the budget-block topic into memory (`BudgetGuard`,
  `pip install 'spendledger[guard]'`) instead of asking `POST /v1/check`, with the server's other
  settings for it (`GuardSettings`: `SPENDLEDGER_TOPIC_PREFIX`, `_KAFKA_SECURITY`, `_USER_ID_HMAC_KEY`,
  `_MAX_TAGS`).

What an event carries: the model and provider, the tokens (cache reads and writes apart), LiteLLM's own
cost as `reported_cost_usd`, status, latency, the request's tags, the end user, `spend_logs_metadata`
and the attribution headers (`X-AnyAPI-*`, `xProxy-*`, `x-litellm-*`). Never messages or responses.
Events are queued and sent by a background thread: a ledger that is down slows no call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import httpx

from spendledger.sdk.client import EventSink, SpendClient, new_event_id
from spendledger.sdk.context import ATTRIBUTION_HEADER_PREFIXES

if TYPE_CHECKING:
    from spendledger.guard import BudgetGuard, GuardSettings

try:  # the proxy has LiteLLM; the module stays importable (and testable) without it
    from litellm.integrations.custom_logger import CustomLogger
except ImportError:  # pragma: no cover - exercised where LiteLLM is absent
    CustomLogger = object

log = logging.getLogger("spendledger.litellm")

# Tags LiteLLM adds by itself (from the User-Agent header): not attribution.
_LITELLM_OWN_TAG_PREFIXES = ("user-agent:",)
_REFUSED_REMEMBERED = 10_000
# Header names that carry a credential (`x-litellm-api-key`, …): never sent, whatever their prefix.
_CREDENTIAL_HEADER = re.compile(r"key|auth|token|secret|password|passwd|cookie|credential|signature", re.I)
# What `POST /v1/check` takes (more is a 422 the caller could provoke): the ledger counts 50 tags at most.
_MAX_CHECK_TAGS, _MAX_MODEL_CHARS, _MAX_PROVIDER_CHARS, _MAX_USER_CHARS = 100, 256, 128, 256
_MAX_RETRY_AFTER_S = 366 * 86_400


class Refused(Exception):
    """The ledger says the call's budget is spent: 429 with `Retry-After`."""

    def __init__(self, blocked_by: list[dict[str, Any]], retry_after_s: int) -> None:
        tags = ", ".join(str(b.get("tag")) for b in blocked_by) or "a budget"
        super().__init__(f"budget exceeded for {tags}; retry after {retry_after_s} s")
        self.blocked_by = blocked_by
        self.retry_after_s = retry_after_s


class HttpCheck:
    """Asks `POST /v1/check`. A ledger that is down, slow or failing (no answer, 5xx, a garbled answer)
    lets the call go ahead and is not asked again for `cooldown_s`; a call the ledger cannot judge
    (another 4xx) goes ahead alone, without pausing the checks of other calls."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout_s: float = 0.25,
        cooldown_s: float = 5.0,
        cache_s: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self.cooldown_s = cooldown_s
        self.cache_s = cache_s
        self._clock = clock
        self._paused_until = 0.0
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def check(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The ledger's answer, or None when it could not give one in time."""
        now = self._clock()
        key = repr(sorted(request.items()))
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        if now < self._paused_until:
            return None
        try:
            # One deadline for the whole exchange (httpx's timeout applies to each phase of it).
            response = await asyncio.wait_for(self._http.post("/v1/check", json=request), self.timeout_s)
            if 400 <= response.status_code < 500:
                log.warning(
                    "spend ledger check refused this call's attribution (HTTP %d); it goes ahead",
                    response.status_code,
                )
                return None
            response.raise_for_status()
            answer = decision(response.json())
        except Exception as exc:  # down, slow, failing or garbled: calls go ahead, unchecked
            self._paused_until = now + self.cooldown_s
            log.warning(
                "spend ledger check failed; calls go ahead unchecked for %.0f s: %s",
                self.cooldown_s,
                type(exc).__name__,
            )
            return None
        self._cache[key] = (now, answer)
        while len(self._cache) > 10_000:
            self._cache.popitem(last=False)
        return answer


class GuardCheck:
    """Answers from the budget-block topic in memory (BudgetGuard); no request per call."""

    def __init__(self, guard: BudgetGuard) -> None:
        self.guard = guard

    @classmethod
    def from_settings(cls, settings: GuardSettings) -> GuardCheck:
        """A check on a started guard: the server's cluster, topic and tag policy (user-id pseudonyms,
        so `user:` budgets match)."""
        from spendledger.guard import BudgetGuard

        return cls(BudgetGuard.from_settings(settings).start())

    async def check(self, request: dict[str, Any]) -> dict[str, Any] | None:
        from ledger.budgets import budget_keys
        from ledger.tags import normalize

        if self.guard.staleness_s is None:
            return None  # still reading the topic
        attribution = normalize(
            headers=request.get("headers"),
            metadata=[{"tags": request.get("tags") or []}],
            users=[request.get("user")],
            policy=self.guard.policy,
        )
        model, provider = str(request.get("model") or ""), str(request.get("provider") or "").lower()
        decision = self.guard.check(budget_keys(attribution.tags, model, provider))
        return {**decision.to_dict(), "retry_after_s": decision.retry_after_s}


class SpendLedgerHandler(CustomLogger):
    """The callback LiteLLM's proxy calls around each request (see the module docstring)."""

    def __init__(self, events: EventSink, checker: HttpCheck | GuardCheck | None = None) -> None:
        super().__init__()
        self.events = events
        self.checker = checker
        self._refused: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------ before the call

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        if self.checker is None:
            return data
        try:
            answer = await self.checker.check(check_request(data))
            if answer is None or answer["allowed"]:
                return data
            refusal = Refused(answer["blocked_by"], retry_after(answer))
        except Exception:  # a bug here must not fail the call
            log.exception("spend ledger check raised; the call goes ahead")
            return data
        call_id = data.get("litellm_call_id")
        if isinstance(call_id, str):
            self._refused[call_id] = None
            while len(self._refused) > _REFUSED_REMEMBERED:
                self._refused.popitem(last=False)
        raise _http_429(refusal)

    # ------------------------------------------------------------ after the call

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(kwargs, "success")

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        call_id = str(kwargs.get("litellm_call_id"))
        if call_id in self._refused:
            del self._refused[call_id]
            return  # our own refusal: no call was made
        self._record(kwargs, "error")

    def _record(self, kwargs: dict[str, Any], status: str) -> None:
        try:
            event = call_event(kwargs, status)
        except Exception:  # never fail the proxy over a logging payload we did not expect
            log.exception("spend ledger could not read LiteLLM's logging payload; the call is not recorded")
            return
        if event is not None:
            self.events.emit(event)


# ------------------------------------------------------------ mapping (pure)


def check_request(data: Mapping[str, Any]) -> dict[str, Any]:
    """The `/v1/check` body for a request the proxy is about to send (its `data` in the pre-call hook),
    held inside what the endpoint takes."""
    metadata = data.get("metadata") if isinstance(data.get("metadata"), Mapping) else {}
    request: dict[str, Any] = {
        "headers": attribution_headers(_request_headers(data)),
        "tags": own_tags((metadata or {}).get("tags"))[:_MAX_CHECK_TAGS],
    }
    user = data.get("user")
    if isinstance(user, str) and user:
        request["user"] = user[:_MAX_USER_CHARS]
    model = deployment_model(data.get("model"))
    if model:
        request["model"] = model[:_MAX_MODEL_CHARS]
        if "/" in model:
            request["provider"] = model.split("/", 1)[0][:_MAX_PROVIDER_CHARS]
    return request


def decision(answer: Any) -> dict[str, Any]:
    """The ledger's answer, checked: `allowed` and, when not, the blocks (ValueError otherwise)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("allowed"), bool):
        raise ValueError("the check's answer has no `allowed`")
    blocked = answer.get("blocked_by") or []
    if not isinstance(blocked, list) or not all(isinstance(b, dict) for b in blocked):
        raise ValueError("the check's `blocked_by` is not a list of blocks")
    return {**answer, "blocked_by": blocked}


def call_event(kwargs: Mapping[str, Any], status: str) -> dict[str, Any] | None:
    """The `completed` event for one call LiteLLM logged, from its standard logging payload."""
    slo = kwargs.get("standard_logging_object")
    if not isinstance(slo, Mapping):
        return None
    metadata = slo.get("metadata") if isinstance(slo.get("metadata"), Mapping) else {}
    params = kwargs.get("litellm_params") if isinstance(kwargs.get("litellm_params"), Mapping) else {}
    request_id = kwargs.get("litellm_call_id") or slo.get("id")
    if not isinstance(request_id, str) or not request_id:
        return None
    event: dict[str, Any] = {
        "kind": "completed",
        "event_id": new_event_id(),
        "request_id": request_id,
        "status": status,
        "model": slo.get("model") or None,
        "provider": slo.get("custom_llm_provider") or None,
        "usage": usage_of(slo, (metadata or {}).get("usage_object")),
    }
    ended = _number(slo.get("endTime"))
    started = _number(slo.get("startTime"))
    if ended is not None:
        event["occurred_at"] = dt.datetime.fromtimestamp(ended, dt.UTC).isoformat()
        if started is not None and ended >= started:
            event["latency_ms"] = round((ended - started) * 1000, 3)
    cost = _decimal(slo.get("response_cost"))
    if cost is not None and status == "success":
        event["reported_cost_usd"] = format(cost, "f")
    if status != "success":
        code = str(
            (
                (slo.get("error_information") or {})
                if isinstance(slo.get("error_information"), Mapping)
                else {}
            ).get("error_code")
            or ""
        )
        if code.isdigit() and 100 <= int(code) <= 599:
            event["http_status"] = int(code)
    headers = attribution_headers(
        _request_headers({"proxy_server_request": (params or {}).get("proxy_server_request")})
    )
    custom = (metadata or {}).get("requester_custom_headers")
    for name, value in attribution_headers(custom if isinstance(custom, Mapping) else {}).items():
        headers.setdefault(name, value)
    if headers:
        event["headers"] = headers
    tags = own_tags(slo.get("request_tags"))
    extra = (metadata or {}).get("spend_logs_metadata")
    event_metadata = dict(extra) if isinstance(extra, Mapping) else {}
    if tags:
        kept = event_metadata.get("tags")
        event_metadata["tags"] = [*(kept if isinstance(kept, list) else []), *tags]
    if event_metadata:
        event["metadata"] = event_metadata
    user = slo.get("end_user")
    if isinstance(user, str) and user:
        event["user"] = user
    return {k: v for k, v in event.items() if v is not None}


def usage_of(slo: Mapping[str, Any], usage: Any) -> dict[str, int]:
    """Tokens in the ledger's own shape: LiteLLM's `prompt_tokens` count every input token, cached ones
    included; its usage object says how many were cache reads and writes."""
    usage = usage if isinstance(usage, Mapping) else {}
    details = (
        usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), Mapping) else {}
    )
    input_tokens = _int(usage.get("prompt_tokens")) or _int(slo.get("prompt_tokens"))
    read = _int((details or {}).get("cached_tokens")) or _int(usage.get("cache_read_input_tokens"))
    write = _int(usage.get("cache_creation_input_tokens")) or _int(
        (details or {}).get("cache_creation_tokens")
    )
    out = {
        "input_tokens": input_tokens,
        "output_tokens": _int(usage.get("completion_tokens")) or _int(slo.get("completion_tokens")),
    }
    if read + write <= input_tokens:
        out.update({"cache_read_tokens": read, "cache_write_tokens": write})
    return out


def attribution_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The attribution headers (`X-AnyAPI-*`, `xProxy-*`, `x-litellm-*`), never one naming a credential."""
    return {
        str(name).lower(): str(value)
        for name, value in headers.items()
        if str(name).lower().startswith(ATTRIBUTION_HEADER_PREFIXES)
        and not _CREDENTIAL_HEADER.search(str(name))
    }


def own_tags(tags: Any) -> list[str]:
    """The request's tags without the ones LiteLLM adds by itself."""
    if not isinstance(tags, list):
        return []
    return [t for t in tags if isinstance(t, str) and not t.lower().startswith(_LITELLM_OWN_TAG_PREFIXES)]


def retry_after(answer: Mapping[str, Any]) -> int:
    """Whole seconds until the first block ends: at least 1, at most a year, 60 when no block says."""
    given = answer.get("retry_after_s")
    if isinstance(given, int) and not isinstance(given, bool) and given > 0:
        return min(given, _MAX_RETRY_AFTER_S)
    ends = []
    for block in answer.get("blocked_by") or []:
        try:
            ends.append(dt.datetime.fromisoformat(str(block.get("window_end"))).timestamp())
        except (ValueError, OverflowError, OSError):
            continue
    if not ends:
        return 60
    return max(1, min(_MAX_RETRY_AFTER_S, int(min(ends) - time.time() + 0.999)))


def deployment_model(group: Any) -> str | None:
    """The model behind a model group of the proxy's router (`gpt-4o` -> `openai/gpt-4o`), else the name."""
    if not isinstance(group, str) or not group:
        return None
    try:
        from litellm.proxy.proxy_server import llm_router

        deployments = llm_router.get_model_list(model_name=group) if llm_router is not None else None
        if deployments:
            model = deployments[0].get("litellm_params", {}).get("model")
            if isinstance(model, str) and model:
                return model
    except Exception:  # not in a proxy, or a router that changed shape: the group's name will do
        return group
    return group


def _request_headers(data: Mapping[str, Any]) -> Mapping[str, Any]:
    request = data.get("proxy_server_request")
    headers = request.get("headers") if isinstance(request, Mapping) else None
    return headers if isinstance(headers, Mapping) else {}


def _http_429(refusal: Refused) -> Exception:
    from fastapi import HTTPException  # the proxy's own web framework

    detail = {"error": "budget_exceeded", "message": str(refusal), "blocked_by": refusal.blocked_by}
    return HTTPException(status_code=429, detail=detail, headers={"Retry-After": str(refusal.retry_after_s)})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        cost = Decimal(str(value)).quantize(Decimal("1e-12"))
    except InvalidOperation:
        return None
    return cost.normalize() if cost.is_finite() and cost >= 0 else None


def from_environment() -> SpendLedgerHandler:
    """The handler configured from the environment (the module docstring)."""
    url, key = os.environ.get("SPENDLEDGER_URL"), os.environ.get("SPENDLEDGER_API_KEY")
    if not url or not key:
        raise RuntimeError(
            "spendledger.integrations.litellm needs SPENDLEDGER_URL and SPENDLEDGER_API_KEY (a producer key)"
        )
    checker: HttpCheck | GuardCheck | None = None
    if os.environ.get("SPENDLEDGER_CHECK", "on").strip().lower() not in ("off", "0", "false", "no"):
        if os.environ.get("SPENDLEDGER_KAFKA_BOOTSTRAP"):
            from spendledger.guard import GuardSettings

            checker = GuardCheck.from_settings(GuardSettings())
        else:
            checker = HttpCheck(
                url,
                key,
                timeout_s=float(os.environ.get("SPENDLEDGER_CHECK_TIMEOUT_S", "0.25")),
                cooldown_s=float(os.environ.get("SPENDLEDGER_CHECK_COOLDOWN_S", "5")),
                cache_s=float(os.environ.get("SPENDLEDGER_CHECK_CACHE_S", "1")),
            )
    return SpendLedgerHandler(SpendClient(url, key), checker)


def __getattr__(name: str) -> Any:
    """`handler` is made on first use, so importing the module needs no environment."""
    if name == "handler":
        globals()["handler"] = instance = from_environment()
        return instance
    raise AttributeError(name)
