"""Budget alerts as delivered to people, and the delivery log (docs/budgets.md, "Alert delivery").

A `json` destination receives `json_body(alert)`: the alert's fields, money as exact decimal
strings, times as ISO-8601 UTC, and `"type": "budget.alert"`. A `slack` destination receives
`slack_body(alert)`, a Slack incoming-webhook message (`text` and `blocks`).

Every delivery carries `X-SpendLedger-Alert-Id` (receivers dedupe on it: delivery is at least
once) and `X-SpendLedger-Timestamp` (unix seconds); a destination with a secret also gets
`X-SpendLedger-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`. The timestamp is
inside the signed text, so a receiver that rejects old timestamps (`verify_signature`) rejects
replays. A header may list several comma-separated signatures (a key being rotated): one match
is enough.

Each attempt's outcome is a `DeliveryAttempt` on `spend.alert-deliveries` (key: the alert id),
landed in `alert_deliveries`. It names the destination, never its URL or secret.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from schemas.budgets import BudgetAlert
from schemas.columns import UInt8, UInt16, UInt32

WEBHOOK_TYPE = "budget.alert"
ALERT_ID_HEADER = "X-SpendLedger-Alert-Id"
TIMESTAMP_HEADER = "X-SpendLedger-Timestamp"
SIGNATURE_HEADER = "X-SpendLedger-Signature"
SIGNATURE_SCHEME = "v1"
REPLAY_TOLERANCE_S = 300.0

DeliveryStatus = Literal["delivered", "retrying", "failed"]


class DeliveryAttempt(BaseModel):
    """Value on `spend.alert-deliveries` (key: the alert id): one attempt to deliver one alert to one
    destination. `attempt` 0: none was made (an unknown destination, an alert too old to send)."""

    model_config = ConfigDict(frozen=True)

    attempt_id: str  # unique per attempt: a copy of this message lands once
    alert_id: str
    tag: str
    destination: str
    attempt: UInt8
    status: DeliveryStatus
    http_status: UInt16 | None = None
    error: str = ""
    latency_ms: UInt32 | None = None
    at: datetime


def decimal_text(value: Decimal | None) -> str | None:
    """A decimal as exact positional text (`1E+2` is "100"), or None."""
    return None if value is None else format(value, "f")


def json_body(alert: BudgetAlert) -> bytes:
    """The body a `json` destination receives (these bytes are what the signature covers)."""
    return orjson.dumps(
        {
            "type": WEBHOOK_TYPE,
            "alert_id": alert.alert_id,
            "tag": alert.tag,
            "kind": alert.kind,
            "threshold_pct": alert.threshold_pct,
            "spend_usd": decimal_text(alert.spend_usd),
            "max_budget_usd": decimal_text(alert.max_budget_usd),
            "soft_budget_usd": decimal_text(alert.soft_budget_usd),
            "window_start": _iso(alert.window_start),
            "window_end": _iso(alert.window_end),
            "at": _iso(alert.at),
            # `projected` alerts: the window's spend at the current rate, and when the budget runs out.
            "projected_spend_usd": decimal_text(alert.projected_spend_usd),
            "exhausted_at": _iso_or_none(alert.exhausted_at),
        }
    )


def slack_body(alert: BudgetAlert) -> bytes:
    """A Slack incoming-webhook message: `text` (notifications, clients without blocks) and `blocks`."""
    spent = _usd(alert.spend_usd)
    window = f"{_minute(alert.window_start)} to {_minute(alert.window_end)} UTC"
    if alert.kind == "soft_budget":
        headline = f"{alert.tag} passed its soft budget"
        detail = f"{spent} spent; soft budget {_usd(alert.soft_budget_usd)}"
    elif alert.kind == "threshold":
        headline = f"{alert.tag} reached {alert.threshold_pct}% of its budget"
        detail = f"{spent} spent of {_usd(alert.max_budget_usd)}"
    else:  # "projected"
        headline = f"{alert.tag} is on course to run out of budget"
        detail = f"{spent} spent of {_usd(alert.max_budget_usd)}"
        if alert.projected_spend_usd is not None:
            detail += f"; {_usd(alert.projected_spend_usd)} by the window's end at the current rate"
        if alert.exhausted_at is not None:
            detail += f"; runs out {_minute(alert.exhausted_at)} UTC"
    text = f"Budget alert: {headline}: {detail} (window {window})."
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Budget alert: {headline}"[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(f"{detail}\nWindow: {window}")}},
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _mrkdwn(f"alert {alert.alert_id} at {_iso(alert.at)}")}],
        },
    ]
    return orjson.dumps({"text": _mrkdwn(text), "blocks": blocks})


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The `X-SpendLedger-Signature` value: `v1=` and the hex HMAC-SHA256 of `"<timestamp>.<body>"`."""
    return f"{SIGNATURE_SCHEME}={_digest(secret, str(timestamp), body)}"


def verify_signature(
    secret: str | bytes,
    timestamp: str | int,
    body: bytes,
    header: str,
    now: float,
    tolerance_s: float = REPLAY_TOLERANCE_S,
) -> bool:
    """True when `header` holds a `v1=` signature of `body` at `timestamp` with `secret`, and the
    timestamp is within `tolerance_s` of `now` (unix seconds) either way. Pass the body exactly as
    received (before any JSON parsing) and the `X-SpendLedger-Timestamp` header as it came."""
    text = str(timestamp).strip()
    if not text.isascii() or not text.isdigit():
        return False
    if abs(now - int(text)) > tolerance_s:
        return False
    expected = _digest(secret, text, body)
    found = False
    for part in header.split(","):
        scheme, _, value = part.strip().partition("=")
        # Every candidate is compared (in constant time each): how many were tried says nothing.
        if scheme == SIGNATURE_SCHEME and hmac.compare_digest(value.strip(), expected):
            found = True
    return found


def _digest(secret: str | bytes, timestamp: str, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime) -> str:
    return _utc(at).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_or_none(at: datetime | None) -> str | None:
    return None if at is None else _iso(at)


def _minute(at: datetime) -> str:
    return _utc(at).strftime("%Y-%m-%d %H:%M")


def _usd(value: Decimal | None) -> str:
    """Dollars and cents for people (the exact figure is in the JSON body)."""
    if value is None:
        return "no limit"
    cents = value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if not cents and value:
        return "under $0.01"
    return f"${cents:,}"


def _mrkdwn(text: str) -> str:
    """Text for Slack's mrkdwn: &, < and > are control characters there."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
