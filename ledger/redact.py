"""Credential detection: the one rule set that keeps secrets out of Kafka, ClickHouse and logs.

Ingest applies it to every string of an event before anything is published (`ingest.events`);
attribution applies the same rules to what it records (`ledger.tags`).

A string is a credential when
- its key's name says so (`is_secret_key`), in any case and with any separator: a word or
  run of words such as password, passwd, pwd, passphrase, secret, credential, cookie,
  authorization, bearer, signature, otp, jwt; `token` (singular: `prompt_tokens`,
  `promptTokenCount` and other counts are not credentials); `auth` and `pass` as the whole
  name or its last word; `key` as the last word after a qualifier that is not a known
  harmless one (`api_key`, `apiKey`, `API-KEY`, `aws_key`, `awsSecretAccessKey`, but not
  `cache_key` or `idempotency_key`, nor `key` alone); or
- its value has the shape of one (`looks_like_secret`), anywhere in the string: provider keys
  with a known prefix (OpenAI `sk-`, `sk-proj-`, Anthropic `sk-ant-`, Stripe `sk_`/`rk_` live
  and test, Hugging Face `hf_`, GitLab `glpat-` and kin, GitHub `ghp_`/`github_pat_` and kin,
  Slack `xox?-` and webhooks, AWS `AKIA`/`ASIA`, Google `AIza`/`ya29.`, Groq, xAI, Perplexity,
  Replicate, npm, PyPI, SendGrid, ...), JWTs, `Bearer`/`Basic` credentials in any case, URLs
  with a password (`postgres://user:pw@host`), PEM blocks, and a `name=value` or `name: value`
  whose name says credential (`pwd:hunter2`, `?api_key=...`, `"token": "..."` in JSON text).

A credential is replaced whole by REDACTED. An identifier that joins or dedupes events
(request id, event id, session id) is replaced instead by `stand_in`: a deterministic,
non-reversible `redacted-` + 16 hex digits of its SHA-256, so two calls never merge and the
request and usage events of one call still join. A number is replaced only under a
credential-named key (a numeric PIN); count names are not credential names, so token counts stay
numbers. Booleans are kept. Prompts are not scanned: ingest drops them at the door.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Collection
from typing import Any

REDACTED = "[REDACTED]"
STAND_IN_PREFIX = "redacted-"

# Substrings of the name with its separators removed and lower-cased (`DB-Password` -> `dbpassword`).
_SECRET_NAME_PART = re.compile(
    r"password|passwd|passphrase|pwd|secret|credential|apikey|privatekey|accesskey|authorization"
    r"|cookie|bearer|accesstoken|refreshtoken|authtoken|apitoken|sessiontoken|securitytoken|bottoken"
)
_SECRET_WORDS = frozenset({"signature", "creds", "jwt", "otp", "totp"})
_LAST_WORD_SECRETS = frozenset({"auth", "pass", "pw"})
# `token` beside one of these names a count, a type or a limit, not a credential.
_TOKEN_QUALIFIERS = frozenset(
    {"count", "counts", "usage", "type", "limit", "limits", "budget", "total", "totals", "estimate",
     "length", "len", "num", "number", "max", "min", "details", "cost", "price", "rate"}
)  # fmt: skip
# `<qualifier>_key` that names a lookup key rather than a credential.
_HARMLESS_KEY_QUALIFIERS = frozenset(
    {"cache", "idempotency", "idempotent", "partition", "sort", "primary", "foreign", "group", "routing",
     "dedupe", "dedup", "lookup", "object", "row", "shard", "public", "message", "event", "request", "trace",
     "join", "index", "unique", "map", "hash", "range", "bucket", "s3", "blob", "redis", "metric", "feature",
     "flag", "tag", "translation", "cursor", "page", "record", "topic", "stream", "queue", "field", "column",
     "table", "model", "prompt", "template", "config", "setting", "sequence", "natural", "composite"}
)  # fmt: skip
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


# Shapes found anywhere in a string, by their first character: the regex engine skips in C to the
# positions holding one of these, then tries only that character's shapes. A prefix must not start
# inside a word (the lookbehind after its first character).
_SHAPES: dict[str, tuple[str, ...]] = {
    "s": (
        r"k-[A-Za-z0-9_\-]{16,}",  # OpenAI sk-, sk-proj-; Anthropic sk-ant-; OpenRouter
        r"k_(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe secret keys
        r"hp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}",  # Shopify
    ),
    "r": (r"k_(?:live|test)_[A-Za-z0-9]{10,}", r"8_[A-Za-z0-9]{30,}"),  # Stripe restricted keys, Replicate
    "w": (r"hsec_[A-Za-z0-9]{20,}",),  # Stripe webhook secrets
    "h": (r"f_[A-Za-z0-9]{30,}",),  # Hugging Face
    "g": (
        r"l(?:pat|dt|rt|ptt|ft|cbt|oas|soat|imt)-[A-Za-z0-9_\-]{20,}",  # GitLab
        r"h[pousr]_[A-Za-z0-9]{30,}",  # GitHub classic
        r"ithub_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained
        r"sk_[A-Za-z0-9]{30,}",  # Groq
    ),
    "x": (
        r"ox[abposre]-[A-Za-z0-9\-]{10,}",  # Slack tokens
        r"app-[0-9]-[A-Za-z0-9\-]{10,}",  # Slack app-level tokens
        r"ai-[A-Za-z0-9]{30,}",  # xAI
    ),
    "A": (
        r"(?:KIA|SIA|BIA|CCA)[0-9A-Z]{16}(?![0-9A-Z])",  # AWS access key ids
        r"Iza[0-9A-Za-z_\-]{30,}",  # Google API keys
    ),
    "y": (r"a29\.[0-9A-Za-z_\-]{20,}",),  # Google OAuth access tokens
    "G": (r"OCSPX-[0-9A-Za-z_\-]{20,}",),  # Google OAuth client secrets
    "p": (r"plx-[A-Za-z0-9]{30,}", r"ypi-AgE[A-Za-z0-9_\-]{50,}"),  # Perplexity, PyPI
    "n": (r"pm_[A-Za-z0-9]{30,}",),  # npm
    "S": (r"G\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}",),  # SendGrid
    "d": (r"o[por]_v1_[a-f0-9]{40,}",),  # DigitalOcean
    "e": (r"yJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",),  # JWT
    # HTTP credentials, `bearer`, `Bearer` or `BEARER` (and the same for basic)
    "b": (r"earer\s+[A-Za-z0-9._~+/\-]{12,}", r"asic\s+[A-Za-z0-9+/]{12,}"),
    "B": (r"earer\s+[A-Za-z0-9._~+/\-]{12,}", r"EARER\s+[A-Za-z0-9._~+/\-]{12,}", r"asic\s+[A-Za-z0-9+/]{12,}",
          r"ASIC\s+[A-Za-z0-9+/]{12,}"),
}  # fmt: skip
_SECRET_VALUE = re.compile(
    "|".join(
        (
            *(f"{first}(?<![A-Za-z0-9].)(?:{'|'.join(rest)})" for first, rest in _SHAPES.items()),
            r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_\-]{16,}",  # Slack webhooks
            r"://[^\s/?#@:]*:[^\s/?#@]+@",  # a URL with a password
            r"-----BEGIN [A-Z0-9 ]{1,48}-----",  # PEM blocks (private keys, PGP, OpenSSH, ...)
        )
    )
)
# `name=value`, `name: value`, `"name": "value"`: found by the separator, then the name before it
# (read backwards) is checked by `is_secret_key`.
_ASSIGNED = re.compile(r"[:=]\s*[\"']?(?!\[REDACTED\])[^\s\"',;&}\]]")
# Every credential-named key holds one of these (lower-cased): a quick test before the names are read.
_NAME_HINT = re.compile(r"pass|pw|secret|token|key|auth|cred|cookie|bearer|signature|jwt|otp")
_NAME_BACKWARDS = re.compile(r"[\"']?\s*([A-Za-z0-9_.\-]{1,64})")

# Memoized checks keep at most this many inputs of at most _CACHED_CHARS characters each: the same
# names and values (models, teams, tags) come on event after event.
_CACHE_SIZE = 16_384
_CACHED_CHARS = 256


def is_secret_key(key: str) -> bool:
    """A metadata, usage or header name that says it carries a credential."""
    return _is_secret_key_cached(key) if len(key) <= _CACHED_CHARS else _is_secret_key(key)


def _is_secret_key(key: str) -> bool:
    joined = _SEPARATORS.sub("", key.lower())
    if _SECRET_NAME_PART.search(joined):
        return True
    words = [w.lower() for w in _WORDS.findall(key)]
    if not words:
        return False
    if "token" in words and not _TOKEN_QUALIFIERS.intersection(words):
        return True
    if _SECRET_WORDS.intersection(words):
        return True
    last = words[-1]
    if last in _LAST_WORD_SECRETS:
        return True
    return last in ("key", "keys") and len(words) > 1 and words[-2] not in _HARMLESS_KEY_QUALIFIERS


_is_secret_key_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_is_secret_key)


def looks_like_secret(value: str) -> bool:
    """A string shaped like a credential, or holding one, whatever its key."""
    return _looks_like_secret_cached(value) if len(value) <= _CACHED_CHARS else _looks_like_secret(value)


def _looks_like_secret(value: str) -> bool:
    if _SECRET_VALUE.search(value):
        return True
    if (":" not in value and "=" not in value) or not _NAME_HINT.search(value.lower()):
        return False
    for m in _ASSIGNED.finditer(value):
        name = _NAME_BACKWARDS.match(value[max(0, m.start() - 66) : m.start()][::-1])
        if name and is_secret_key(name.group(1)[::-1]):
            return True
    return False


_looks_like_secret_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_looks_like_secret)


def stand_in(identifier: str) -> str:
    """A deterministic, non-reversible replacement for a credential used as an identifier: the same
    input always gives the same stand-in (joins and dedupe hold), different inputs different ones."""
    return STAND_IN_PREFIX + hashlib.sha256(identifier.encode()).hexdigest()[:16]


def redact_text(value: str) -> str:
    """The string, or REDACTED when it looks like (or holds) a credential."""
    return REDACTED if looks_like_secret(value) else value


def redact_identifier(value: str) -> str:
    """The identifier, or its `stand_in` when it looks like a credential (never one shared constant:
    request ids join events and event ids dedupe them)."""
    return stand_in(value) if looks_like_secret(value) else value


def redact_value(key: str, value: Any, *, identifiers: Collection[str] = ()) -> Any:
    """One value redacted by its key and, for strings, its shape; containers recursively, their keys too.

    Under a credential-named key every string and number inside is replaced. A key that itself looks
    like a credential becomes its `stand_in` (distinct keys stay distinct) and its value is redacted.
    Keys in `identifiers` (lower case, `_` for separators) get a `stand_in` instead of REDACTED.
    """
    return _redact(key, value, is_secret_key(key), identifiers)


def _redact(key: str, value: Any, secret: bool, identifiers: Collection[str]) -> Any:
    if isinstance(value, str):
        if secret:
            return REDACTED if value else value
        if not looks_like_secret(value):
            return value
        if identifiers and _SEPARATORS.sub("_", key.lower()) in identifiers:
            return stand_in(value)
        return REDACTED
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = str(k)
            if looks_like_secret(name):
                out[stand_in(name)] = _redact(name, v, True, identifiers)
            else:
                out[name] = _redact(name, v, secret or is_secret_key(name), identifiers)
        return out
    if isinstance(value, list):
        return [_redact(key, v, secret, identifiers) for v in value]
    if secret and isinstance(value, int | float) and not isinstance(value, bool):
        return REDACTED
    return value
