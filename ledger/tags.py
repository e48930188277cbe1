"""Attribution: every tagging input producers use, normalized to canonical dimensions.

Inputs, in precedence order (the first value seen for a dimension wins; a
different later value is recorded as a conflict, never silently dropped):

1. `X-AnyAPI-*` headers (`App-ID`, `App-Name`, `App-Version`, `User-ID`,
   `Session-ID`, `Tenant-ID`, and any other `X-AnyAPI-<key>`),
2. `xProxy-*` headers (`xProxy-User-ID`),
3. `x-litellm-tags` (comma list) and `x-litellm-spend-logs-metadata` (JSON),
4. the event's `metadata`, then the original request body's `metadata`:
   flat fields (`app_id`, `department`, …), `tags` (list of `key:value`) and
   `spend_logs_metadata` (free key/values),
5. the event's `user`, then the body's `user`.

Header names are case-insensitive. Canonical tags are `key:value`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ledger.redact import REDACTED, is_secret_key, looks_like_secret

DIMENSIONS: tuple[str, ...] = (
    "app",
    "env",
    "team",
    "project",
    "feature",
    "user",
    "session",
    "tenant",
    "region",
    "version",
)

# Field names producers use, mapped to canonical dimensions (keys are compared
# lower-cased with `-` read as `_`). `app_name` is a label, not a dimension.
KEY_ALIASES: dict[str, str] = {
    **{k: "app" for k in ("app", "app_id", "application", "application_id")},
    **{k: "env" for k in ("env", "environment", "deployment_environment")},
    **{
        k: "team"
        for k in (
            "team",
            "owner",
            "department",
            "dept",
            "cost_center",
            "costcenter",
            "cost_centre",
            "squad",
            "business_unit",
        )
    },
    **{k: "project" for k in ("project", "project_id")},
    **{k: "feature" for k in ("feature", "use_case", "usecase", "feature_name", "workflow")},
    **{k: "user" for k in ("user", "user_id", "end_user", "end_user_id")},
    **{k: "session" for k in ("session", "session_id", "conversation_id", "thread_id")},
    **{k: "tenant" for k in ("tenant", "tenant_id", "customer_id", "org_id", "organization_id")},
    **{k: "region" for k in ("region",)},
    **{k: "version" for k in ("version", "app_version")},
}
APP_NAME_KEYS = frozenset({"app_name", "application_name"})

ENV_ALIASES: dict[str, str] = {
    "prod": "production",
    "prd": "production",
    "live": "production",
    "production": "production",
    "stg": "staging",
    "stage": "staging",
    "staging": "staging",
    "preprod": "staging",
    "dev": "development",
    "develop": "development",
    "development": "development",
    "local": "development",
    "test": "test",
    "testing": "test",
    "qa": "test",
}

# Record columns for each dimension.
DIMENSION_COLUMNS: dict[str, str] = {
    "app": "app_id",
    "env": "environment",
    "team": "team",
    "project": "project",
    "feature": "feature",
    "user": "user_id",
    "session": "session_id",
    "tenant": "tenant_id",
    "region": "region",
    "version": "app_version",
}

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
# Printable, no commas (they split x-litellm-tags), no quotes or backslashes.
_VALUE_RE = re.compile(r'^[^\x00-\x1f\x7f,"\\]+$')
_USER_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]+$")

ANYAPI_PREFIX = "x-anyapi-"
XPROXY_PREFIX = "xproxy-"
LITELLM_TAGS = "x-litellm-tags"
LITELLM_METADATA = "x-litellm-spend-logs-metadata"
ATTRIBUTION_HEADER_PREFIXES = (ANYAPI_PREFIX, XPROXY_PREFIX, "x-litellm-")


@dataclass(frozen=True)
class AttributionPolicy:
    """Limits and options for normalization."""

    max_tags: int = 50
    max_key_chars: int = 64
    max_value_chars: int = 128
    max_user_id_chars: int = 256
    max_metadata_keys: int = 100
    max_metadata_value_chars: int = 1024
    user_id_hmac_key: bytes | None = field(default=None, repr=False)  # a secret: never in a repr


@dataclass
class CanonicalAttribution:
    """The canonical attribution of one call."""

    dimensions: dict[str, str] = field(default_factory=dict)
    app_name: str = ""
    labels: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        """Canonical `key:value` tags for every dimension, plus free labels; sorted, unique."""
        # Sessions are per-conversation: far too many values to be a budget or report tag.
        dims = [f"{k}:{v}" for k, v in self.dimensions.items() if k != "session"]
        return sorted(set(dims) | set(self.labels))

    def columns(self) -> dict[str, str]:
        """Dimension values keyed by record column name ('' when absent)."""
        out = {column: self.dimensions.get(dim, "") for dim, column in DIMENSION_COLUMNS.items()}
        out["app_name"] = self.app_name
        return out


_KEY_SEPARATORS = re.compile(r"[\s\-]+")

# Memoized checks keep at most this many inputs of at most _CACHED_CHARS characters each (a few MB):
# the same keys and values come on call after call, and checking them again was half of attribution.
_CACHE_SIZE = 16_384
_CACHED_CHARS = 256


def canonical_key(key: str) -> str:
    """`X-Cost Center` -> `x_cost_center`: lower-case, `-` and spaces read as `_`."""
    return _canonical_key_cached(key) if len(key) <= _CACHED_CHARS else _canonical_key(key)


def _canonical_key(key: str) -> str:
    return _KEY_SEPARATORS.sub("_", key.strip().lower())


_canonical_key_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_canonical_key)


def _check_value(dim_or_key: str, text: str, max_chars: int) -> tuple[str | None, tuple[str, str] | None]:
    """A stripped tag value checked: (the value, None), or (None, (reason, input)) when it is invalid."""
    if text == REDACTED or looks_like_secret(text) or is_secret_key(dim_or_key):
        # (REDACTED: ingest already replaced a credential; the marker is no tag value either)
        return None, ("secret_redacted", f"{dim_or_key}:{REDACTED}")
    if not text:
        return None, ("empty_value", f"{dim_or_key}:")
    if len(text) > max_chars:
        return None, ("too_long", f"{dim_or_key}:{text}")
    if not _VALUE_RE.match(text):
        return None, ("bad_characters", f"{dim_or_key}:{text}")
    return text, None


_check_value_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_check_value)


def hash_user_id(user_id: str, key: bytes) -> str:
    """Stable, keyed pseudonym for a user id (HMAC-SHA256, 128 bits shown)."""
    return "uh_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


class _Builder:
    def __init__(self, policy: AttributionPolicy) -> None:
        self.policy = policy
        self.out = CanonicalAttribution()

    def invalid(self, reason: str, raw: str) -> None:
        self.out.invalid.append(
            f"{reason}|{raw[: self.policy.max_key_chars + self.policy.max_value_chars + 1]}"
        )

    def _clean_value(self, dim_or_key: str, value: Any) -> str | None:
        """Validate a tag value; returns None (and records why) when invalid."""
        text = _stringify(value).strip()
        short = len(text) + len(dim_or_key) <= _CACHED_CHARS
        check = _check_value_cached if short else _check_value
        clean, problem = check(dim_or_key, text, self.policy.max_value_chars)
        if problem is not None:
            self.invalid(*problem)
        return clean

    def dimension(self, dim: str, value: Any) -> None:
        if dim == "user":
            self.user(value)
            return
        text = self._clean_value(dim, value)
        if text is None:
            return
        if dim == "env":
            text = ENV_ALIASES.get(text.lower(), text.lower())
        self._set(dim, text)

    def _set(self, dim: str, text: str) -> None:
        current = self.out.dimensions.get(dim)
        if current is None:
            self.out.dimensions[dim] = text
        elif current != text:
            self.invalid("conflict", f"{dim}:{text}")

    def user(self, value: Any) -> None:
        text = _stringify(value).strip()
        if not text:
            return
        key = self.policy.user_id_hmac_key
        shown = hash_user_id(text, key) if key else text
        if text == REDACTED or looks_like_secret(text):
            self.invalid("secret_redacted", f"user:{REDACTED}")
        elif len(text) > self.policy.max_user_id_chars or not _USER_ID_RE.match(text):
            self.invalid("bad_user_id", f"user:{shown}")
        else:
            self._set("user", shown)

    def app_name(self, value: Any) -> None:
        text = _stringify(value).strip()
        if not text:
            return
        if text == REDACTED or looks_like_secret(text):
            self.invalid("secret_redacted", f"app_name:{REDACTED}")
        elif not self.out.app_name:
            self.out.app_name = text[: self.policy.max_value_chars]

    def tag(self, raw: Any) -> None:
        """One `key:value` tag (or a bare label) from a tag list."""
        if not isinstance(raw, str):
            self.invalid("not_a_string", _stringify(raw))
            return
        text = raw.strip()
        if not text:
            return
        key, sep, value = text.partition(":")
        if not sep:
            label = self._clean_value("label", text)
            if label is not None:
                self.label(label)
            return
        ckey = canonical_key(key)
        dim = KEY_ALIASES.get(ckey)
        if dim is not None:
            self.dimension(dim, value)
        elif ckey in APP_NAME_KEYS:
            self.app_name(value)
        elif not _KEY_RE.match(ckey) or len(ckey) > self.policy.max_key_chars:
            self.invalid("bad_key", text)
        else:
            clean = self._clean_value(ckey, value)
            if clean is not None:
                self.label(f"{ckey}:{clean}")

    def label(self, label: str) -> None:
        if label in self.out.labels:
            return
        if len(self.out.labels) + len(self.out.dimensions) >= self.policy.max_tags:
            self.invalid("too_many_tags", label)
            return
        self.out.labels.append(label)

    def field(self, key: str, value: Any) -> None:
        """A flat key/value (metadata field, spend_logs_metadata entry, header)."""
        if value is None:
            return
        ckey = canonical_key(key)
        dim = KEY_ALIASES.get(ckey)
        if dim is not None:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                self.dimension(dim, value)
            else:
                self.invalid("not_a_scalar", f"{ckey}:{_stringify(value)}")
        elif ckey in APP_NAME_KEYS:
            self.app_name(value)
        else:
            self.meta(ckey, value)

    def meta(self, key: str, value: Any) -> None:
        if not _KEY_RE.match(key) or len(key) > self.policy.max_key_chars:
            self.invalid("bad_key", key)
            return
        if key in self.out.metadata:
            return
        if len(self.out.metadata) >= self.policy.max_metadata_keys:
            self.invalid("too_many_metadata_keys", key)
            return
        text = REDACTED if is_secret_key(key) else _stringify(value)
        if looks_like_secret(text):
            text = REDACTED
        limit = self.policy.max_metadata_value_chars
        if len(text) > limit:
            self.invalid("metadata_truncated", key)
            text = text[:limit]
        self.out.metadata[key] = text

    def metadata_object(self, metadata: Mapping[str, Any]) -> None:
        for key, value in metadata.items():
            if key == "tags":
                self.tag_list(value)
            elif key == "spend_logs_metadata":
                if isinstance(value, Mapping):
                    for k, v in value.items():
                        self.field(str(k), v)
                elif value is not None:
                    self.invalid("not_an_object", "spend_logs_metadata")
            else:
                self.field(str(key), value)

    def tag_list(self, value: Any) -> None:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            self.invalid("not_a_list", "tags")
            return
        for item in value:
            self.tag(item)


def normalize(
    *,
    headers: Mapping[str, str] | None = None,
    metadata: Iterable[Mapping[str, Any] | None] = (),
    users: Iterable[Any] = (),
    policy: AttributionPolicy | None = None,
) -> CanonicalAttribution:
    """Normalize every attribution input of one call (see the module docstring for the order)."""
    b = _Builder(policy or AttributionPolicy())
    lowered = {name.strip().lower(): value for name, value in (headers or {}).items()}
    for name, value in _prefixed(lowered, ANYAPI_PREFIX):
        b.field(name, value)
    for name, value in _prefixed(lowered, XPROXY_PREFIX):
        b.field(name, value)
    if LITELLM_TAGS in lowered:
        b.tag_list(lowered[LITELLM_TAGS])
    if LITELLM_METADATA in lowered:
        try:
            parsed = orjson.loads(lowered[LITELLM_METADATA])
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            for key, value in parsed.items():
                b.field(str(key), value)
        else:
            b.invalid("bad_json", LITELLM_METADATA)
    for meta in metadata:
        if meta:
            b.metadata_object(meta)
    for user in users:
        if user is not None:
            b.user(user)
    return b.out


def explain(entry: str, policy: AttributionPolicy) -> dict[str, str]:
    """A `CanonicalAttribution.invalid` entry ("reason|input") as reason, input and a sentence for a person."""
    reason, _, raw = entry.partition("|")
    shown = raw if len(raw) <= 80 else raw[:79] + "…"
    template = _EXPLAINED.get(reason, "not recorded ({reason})")
    return {"reason": reason, "input": shown, "message": template.format(reason=reason, p=policy)}


_EXPLAINED = {
    "too_many_tags": "more than {p.max_tags} tags and dimensions on one call: this tag was not recorded",
    "too_long": "tag values are at most {p.max_value_chars} characters: this tag was not recorded",
    "bad_characters": "tag values are printable, without commas, quotes or backslashes: this tag was not recorded",
    "empty_value": "the tag has an empty value: it was not recorded",
    "bad_key": "keys are at most {p.max_key_chars} characters of a-z, 0-9, '_', '.', '-', starting with a letter "
    "or digit: not recorded",
    "too_many_metadata_keys": "more than {p.max_metadata_keys} metadata keys on one call: this key was not recorded",
    "metadata_truncated": "metadata values are at most {p.max_metadata_value_chars} characters: this one was cut "
    "there",
    "secret_redacted": "the value looks like a credential: it was not recorded",
    "conflict": "a second, different value for a dimension that already has one: the first one was kept",
    "bad_user_id": "user ids are at most {p.max_user_id_chars} characters of A-Z, a-z, 0-9, '.', '_', ':', '-': "
    "not recorded",
    "not_a_string": "tags are strings: this one was not recorded",
    "not_a_scalar": "a dimension takes a string or a number: not recorded",
    "not_an_object": "spend_logs_metadata must be an object: not recorded",
    "not_a_list": "metadata.tags must be a list of strings: not recorded",
    "bad_json": "x-litellm-spend-logs-metadata is not a JSON object: not recorded",
}


def _prefixed(headers: Mapping[str, str], prefix: str) -> Iterator[tuple[str, str]]:
    for name, value in headers.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            yield name[len(prefix) :], value


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str).decode()
    except TypeError:  # e.g. an integer beyond 64 bits, which orjson cannot write
        return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
