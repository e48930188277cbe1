"""What ingest keeps of an event before it is published: no prompts, no credentials."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from ledger.attribute import attribution_of
from ledger.redact import REDACTED, is_secret_key, looks_like_secret, redact_value
from ledger.tags import ATTRIBUTION_HEADER_PREFIXES, AttributionPolicy, explain
from schemas.events import RawEvent

# Of the original request body only these keys are kept; `messages`, `input`,
# `prompt` and everything else the model saw is dropped at the door.
BODY_KEYS_KEPT = ("model", "user", "metadata")


def default_event_id(kind: str, request_id: str) -> str:
    """Deterministic id for an event sent without one: a retry of the same call is the same event."""
    digest = hashlib.blake2b(f"{kind}\x1f{request_id}".encode(), digest_size=12).hexdigest()
    return f"evt_{digest}"


def attribution_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    """Keep only attribution headers; `Authorization`, cookies and API keys never pass."""
    if not headers:
        return None
    kept = {}
    for name, value in headers.items():
        lowered = name.strip().lower()
        if lowered.startswith(ATTRIBUTION_HEADER_PREFIXES) and not is_secret_key(lowered):
            kept[name] = REDACTED if looks_like_secret(value) else value
    return kept or None


def sanitize(event: RawEvent, *, received_at: datetime) -> dict[str, Any]:
    """The event as published to `spend.raw`: ids and times filled in, secrets and prompts removed."""
    body = None
    if event.body:
        body = {k: redact_value(k, event.body[k]) for k in BODY_KEYS_KEPT if k in event.body}
    user = event.user
    if isinstance(user, str) and looks_like_secret(user):
        user = REDACTED
    cleaned = event.model_copy(
        update={
            "event_id": event.event_id or default_event_id(event.kind, event.request_id),
            "received_at": received_at,
            "occurred_at": event.occurred_at or received_at,
            "headers": attribution_headers(event.headers),
            "metadata": redact_value("metadata", event.metadata) if event.metadata else None,
            "body": body or None,
            "user": user,
        }
    )
    return cleaned.model_dump(mode="json", exclude_none=True)


def attribution_warnings(published: list[dict[str, Any]], policy: AttributionPolicy) -> list[dict[str, Any]]:
    """What the ledger will not record of each accepted event's attribution (a tag over a limit, a bad
    key, ...), found by the worker's own rules. The spend is counted regardless; only the tag is dropped.
    Computed on the sanitized events, so no credential is echoed back."""
    warnings = []
    for index, event in enumerate(published):
        invalid = attribution_of([event], policy).invalid
        if invalid:
            problems = [explain(entry, policy) for entry in invalid]
            warnings.append({"index": index, "event_id": event["event_id"], "problems": problems})
    return warnings
