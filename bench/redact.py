"""Ingest's redaction cost per event: what `sanitize` spends on finding and replacing credentials.

    .venv/bin/python bench/redact.py [--events 20000] [--rounds 5] [--detect-secrets]

Times, per event and best of `--rounds`, for a representative event (the pipeline bench's:
app header, team/env tags, a feature, a user, usage) and for one carrying a credential in every
field: `sanitize` as ingest runs it, and the same copy and dump without any redaction (the
floor `sanitize` pays regardless). Their difference is the redaction's cost. No broker, no HTTP.

`--detect-secrets` also times Yelp's detect-secrets (`pip install detect-secrets`, not a project
dependency) scanning the same event's strings with its default plugins, with and without its two
high-entropy ones, for comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from common import machine
from pipeline import event as representative

from ingest.events import BODY_KEYS_KEPT, default_event_id, sanitize
from ledger.tags import ATTRIBUTION_HEADER_PREFIXES
from schemas.events import RawEvent

RECEIVED_AT = datetime(2026, 12, 1, tzinfo=UTC)

# Fake credentials of the real shapes (none of them valid anywhere).
STRIPE = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
HUGGING_FACE = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"
GITLAB = "glpat-" + "x8Yz1AbCdEfGhIjKlMnO"
OPENAI = "sk-proj-" + "Xy7kQ2mN9pL4rT6vW8zB1cD3fG5hJ0aS"
AWS = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def with_secrets(i: int, run: str) -> dict[str, Any]:
    """The representative event with a credential in every field an event carries."""
    e = representative(i, run)
    e["request_id"] = f"{STRIPE}{i}"
    e["event_id"] = f"{GITLAB}{i}"
    e["model"] = HUGGING_FACE
    e["provider"] = OPENAI
    e["status"] = "bearer abcdefghijklmnop"
    e["user"] = STRIPE
    e["headers"] = {
        **e["headers"],
        "X-AnyAPI-User-ID": HUGGING_FACE,
        "X-AnyAPI-Session-ID": GITLAB,
    }
    e["metadata"] = {
        "tags": [f"feature:f{i % 11}", "pwd:hunter2"],
        "aws_key": AWS,
        "pwd": "hunter2",
        "db_pwd": "hunter2",
        "dsn": "postgres://app:hunter2@db:5432/ledger",
    }
    e["usage"] = {**e["usage"], "api_key": OPENAI}
    return e


def unredacted(event: RawEvent, *, received_at: datetime) -> dict[str, Any]:
    """What `sanitize` does besides redaction: ids and times filled, headers and body keys kept."""
    headers = {
        name: value
        for name, value in (event.headers or {}).items()
        if name.strip().lower().startswith(ATTRIBUTION_HEADER_PREFIXES)
    }
    body = {k: event.body[k] for k in BODY_KEYS_KEPT if k in event.body} if event.body else None
    cleaned = event.model_copy(
        update={
            "event_id": event.event_id or default_event_id(event.kind, event.request_id),
            "received_at": received_at,
            "occurred_at": event.occurred_at or received_at,
            "headers": headers or None,
            "body": body or None,
        }
    )
    return cleaned.model_dump(mode="json", exclude_none=True)


def best_us(fn: Callable[[RawEvent], Any], events: list[RawEvent], rounds: int) -> float:
    """Microseconds per event, best of `rounds` passes over `events`."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for e in events:
            fn(e)
        best = min(best, time.perf_counter() - started)
    return best / len(events) * 1e6


def strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings_of(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_of(v)


def detect_secrets_scan(entropy: bool) -> Callable[[RawEvent], Any]:
    """detect-secrets' default plugins (`entropy` False: without the two high-entropy ones, which flag
    model names and ids as secrets) over every string of the event, one `scan_line` each."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import default_settings, get_settings, transient_settings

    with default_settings():
        plugins = get_settings().json()["plugins_used"]
    if not entropy:
        plugins = [p for p in plugins if "Entropy" not in p["name"]]
    transient_settings({"plugins_used": plugins}).__enter__()  # configured for the rest of the run

    def scan(event: RawEvent) -> list[Any]:
        found = []
        for text in strings_of(event.model_dump(mode="json", exclude_none=True)):
            found.extend(scan_line(text))
        return found

    return scan


def run(total: int, rounds: int, library: bool) -> dict[str, float]:
    def sanitized(e: RawEvent) -> dict[str, Any]:
        return sanitize(e, received_at=RECEIVED_AT)

    def floor(e: RawEvent) -> dict[str, Any]:
        return unredacted(e, received_at=RECEIVED_AT)

    figures: dict[str, float] = {}
    for name, make in (("plain", representative), ("secrets", with_secrets)):
        events = [RawEvent.model_validate(make(i, "bench")) for i in range(total)]
        sanitize_us = best_us(sanitized, events, rounds)
        floor_us = best_us(floor, events, rounds)
        figures[f"{name}_sanitize_us"] = sanitize_us
        figures[f"{name}_unredacted_us"] = floor_us
        figures[f"{name}_redaction_us"] = sanitize_us - floor_us
        if library:
            figures[f"{name}_detect_secrets_us"] = best_us(detect_secrets_scan(True), events, rounds)
            figures[f"{name}_detect_secrets_no_entropy_us"] = best_us(
                detect_secrets_scan(False), events, rounds
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--detect-secrets", action="store_true")
    args = parser.parse_args()
    r = run(args.events, args.rounds, args.detect_secrets)
    print(machine())
    print(f"µs per event, best of {args.rounds} passes over {args.events:,} events")
    print(f"{'event':<10}{'sanitize':>10}{'unredacted':>12}{'redaction':>11}")
    for name in ("plain", "secrets"):
        print(
            f"{name:<10}{r[f'{name}_sanitize_us']:>10.2f}{r[f'{name}_unredacted_us']:>12.2f}"
            f"{r[f'{name}_redaction_us']:>11.2f}"
        )
    if args.detect_secrets:
        for name in ("plain", "secrets"):
            print(
                f"detect-secrets, {name} event: {r[f'{name}_detect_secrets_us']:.1f} µs with its default plugins, "
                f"{r[f'{name}_detect_secrets_no_entropy_us']:.1f} µs without the entropy ones"
            )


if __name__ == "__main__":
    main()
