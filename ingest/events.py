"""What ingest keeps of an event before it is published: no prompts, no credentials."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import orjson

from ledger.attribute import canonical_attribution
from ledger.redact import (
    is_secret_key,
    looks_like_secret,
    redact_identifier,
    redact_text,
    redact_value,
)
from ledger.tags import (
    ANYAPI_PREFIX,
    ATTRIBUTION_HEADER_PREFIXES,
    KEY_ALIASES,
    LITELLM_METADATA,
    LITELLM_TAGS,
    XPROXY_PREFIX,
    AttributionPolicy,
    canonical_key,
    explain,
)
from schemas.events import RawEvent

# Of the original request body only these keys are kept; `messages`, `input`,
# `prompt` and everything else the model saw is dropped at the door.
BODY_KEYS_KEPT = ("model", "user", "metadata")


def default_event_id(kind: str, request_id: str) -> str:
    """Deterministic id for an event sent without one: a retry of the same call is the same event."""
    digest = hashlib.blake2b(f"{kind}\x1f{request_id}".encode(), digest_size=12).hexdigest()
    return f"evt_{digest}"


# Names (lower case, `_` for separators) whose values identify a session: a credential there gets a
# stand-in rather than REDACTED, so one session's calls stay together.
SESSION_KEYS = frozenset(key for key, dim in KEY_ALIASES.items() if dim == "session")


def attribution_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    """Keep only attribution headers; `Authorization`, cookies and API keys never pass, and a credential
    in a kept header's value is redacted (element by element in the tag list and the metadata JSON)."""
    if not headers:
        return None
    kept = {}
    for name, value in headers.items():
        lowered = name.strip().lower()
        if lowered.startswith(ATTRIBUTION_HEADER_PREFIXES) and not is_secret_key(lowered):
            if not looks_like_secret(name):
                kept[name] = _header_value(lowered, value)
    return kept or None


def _header_value(lowered: str, value: str) -> str:
    if not looks_like_secret(value):
        return value
    if lowered == LITELLM_TAGS:
        return ",".join(redact_text(tag) for tag in value.split(","))
    if lowered == LITELLM_METADATA:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return orjson.dumps(redact_value(lowered, parsed, identifiers=SESSION_KEYS)).decode()
    for prefix in (ANYAPI_PREFIX, XPROXY_PREFIX):
        if lowered.startswith(prefix) and canonical_key(lowered[len(prefix) :]) in SESSION_KEYS:
            return redact_identifier(value)
    return redact_text(value)


def sanitize(event: RawEvent, *, received_at: datetime) -> dict[str, Any]:
    """The event as published to `spend.raw`: ids and times filled in, secrets and prompts removed.

    Every string the event carries goes through `ledger.redact`. The request id, event id and session
    ids get a deterministic stand-in when they look like a credential (`redact_identifier`), never one
    shared constant: the join by request id and the dedupe by event id would merge unrelated calls.
    """
    body = None
    if event.body:
        kept = {k: event.body[k] for k in BODY_KEYS_KEPT if k in event.body}
        body = redact_value("body", kept, identifiers=SESSION_KEYS)
    request_id = redact_identifier(event.request_id)
    event_id = (
        redact_identifier(event.event_id) if event.event_id else default_event_id(event.kind, request_id)
    )
    cleaned = event.model_copy(
        update={
            "request_id": request_id,
            "event_id": event_id,
            "received_at": received_at,
            "occurred_at": event.occurred_at or received_at,
            "model": _text(event.model),
            "provider": _text(event.provider),
            "status": _text(event.status),
            "headers": attribution_headers(event.headers),
            "metadata": redact_value("metadata", event.metadata, identifiers=SESSION_KEYS)
            if event.metadata
            else None,
            "body": body or None,
            "user": _text(event.user) if isinstance(event.user, str) else event.user,
            "usage": redact_value("usage", event.usage) if event.usage else event.usage,
        }
    )
    return cleaned.model_dump(mode="json", exclude_none=True)


def _text(value: str | None) -> str | None:
    return None if value is None else redact_text(value)


def attribution_warnings(published: list[dict[str, Any]], policy: AttributionPolicy) -> list[dict[str, Any]]:
    """What the ledger will not record of each accepted event's attribution (a tag over a limit, a bad
    key, ...), found by the worker's own rules. The spend is counted regardless; only the tag is dropped.
    Computed on the sanitized events, so no credential is echoed back."""
    warnings = []
    for index, event in enumerate(published):
        invalid = canonical_attribution([event], policy).invalid
        if invalid:
            problems = [explain(entry, policy) for entry in invalid]
            warnings.append({"index": index, "event_id": event["event_id"], "problems": problems})
    return warnings
