"""Token usage: our shape and provider-native shapes, converted by one rule.

In the ledger `input_tokens` counts ALL input tokens, cache reads and cache
writes included; `cache_read_tokens` / `cache_write_tokens` say how many of them
were cached (the OpenAI and genai-prices convention). Anthropic's
`input_tokens` EXCLUDES its cache tokens, so they are added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.errors import UsageError

MAX_TOKENS = 10**12


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of one call, in the ledger's convention."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            value = getattr(self, name)
            if value < 0 or value > MAX_TOKENS:
                raise UsageError(f"{name} must be between 0 and {MAX_TOKENS}, got {value}")
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            raise UsageError(
                "cache_read_tokens + cache_write_tokens exceed input_tokens; in this ledger "
                "input_tokens counts all input tokens, cached ones included"
            )

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.cache_read_tokens - self.cache_write_tokens


def _count(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"usage.{key} must be a whole number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise UsageError(f"usage.{key} must be a whole number, got {value!r}")
    return int(value)


def _nested(obj: Mapping[str, Any], outer: str, inner: str) -> int:
    details = obj.get(outer)
    if details is None:
        return 0
    if not isinstance(details, Mapping):
        raise UsageError(f"usage.{outer} must be an object")
    return _count(details, inner)


def parse_usage(usage: Mapping[str, Any] | None) -> TokenUsage:
    """Convert a usage object (ours, OpenAI, Anthropic or Gemini shape) to TokenUsage."""
    if usage is None:
        return TokenUsage()
    if not isinstance(usage, Mapping):
        raise UsageError("usage must be an object")
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        # OpenAI Chat Completions: prompt_tokens includes cached tokens.
        return TokenUsage(
            input_tokens=_count(usage, "prompt_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
            cache_read_tokens=_nested(usage, "prompt_tokens_details", "cached_tokens"),
        )
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        # Anthropic: input_tokens excludes both cache reads and cache writes.
        read = _count(usage, "cache_read_input_tokens")
        write = _count(usage, "cache_creation_input_tokens")
        return TokenUsage(
            input_tokens=_count(usage, "input_tokens") + read + write,
            output_tokens=_count(usage, "output_tokens"),
            cache_read_tokens=read,
            cache_write_tokens=write,
        )
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        # Gemini: promptTokenCount includes cached content; thinking tokens bill as output.
        return TokenUsage(
            input_tokens=_count(usage, "promptTokenCount"),
            output_tokens=_count(usage, "candidatesTokenCount") + _count(usage, "thoughtsTokenCount"),
            cache_read_tokens=_count(usage, "cachedContentTokenCount"),
        )
    # Ours, which is also the OpenAI Responses API shape (input_tokens includes cached).
    cache_read = _count(usage, "cache_read_tokens") or _nested(usage, "input_tokens_details", "cached_tokens")
    return TokenUsage(
        input_tokens=_count(usage, "input_tokens"),
        output_tokens=_count(usage, "output_tokens"),
        cache_read_tokens=cache_read,
        cache_write_tokens=_count(usage, "cache_write_tokens"),
    )
