"""API key scopes, and what a bound producer key may claim.

Three scopes, each a superset of nothing else but admin:

- `producer` sends events and asks `/v1/check`;
- `analyst` reads: reports, SQL, the dashboard, budget views;
- `admin` does everything, and alone manages budgets, limits and keys.

A producer key may be *bound*: to the apps it may claim, the tenants, and the tags. An
event whose attribution claims anything outside the binding is refused as a whole, naming
the field, so one team's key cannot charge (or block) another team's budget. Tag patterns
are `key:value` for one tag or `key:*` for every value of a key. App and tenant tags follow
their own lists when the key has one. A bound key's every other tag must match a pattern:
a key bound to an app only claims no team, user or environment (`--tag 'env:*'` allows one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from ledger.tags import CanonicalAttribution

Scope = Literal["producer", "analyst", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)

# What each scope may do, by permission.
_ALLOWED: dict[str, frozenset[Scope]] = {
    "send": frozenset({"producer", "admin"}),
    "check": frozenset({"producer", "analyst", "admin"}),
    "read": frozenset({"analyst", "admin"}),
    "manage": frozenset({"admin"}),
}
Permission = Literal["send", "check", "read", "manage"]


def allows(scope: Scope, permission: Permission) -> bool:
    return scope in _ALLOWED[permission]


def scopes_allowed(permission: Permission) -> list[Scope]:
    return [s for s in SCOPES if s in _ALLOWED[permission]]


@dataclass(frozen=True)
class Binding:
    """What a producer key may claim; an empty list leaves that field free."""

    apps: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()

    @classmethod
    def of(cls, apps: Iterable[str] = (), tenants: Iterable[str] = (), tags: Iterable[str] = ()) -> Binding:
        return cls(frozenset(apps), frozenset(tenants), frozenset(tags))

    @property
    def bound(self) -> bool:
        return bool(self.apps or self.tenants or self.tags)

    def violation(self, attribution: CanonicalAttribution) -> tuple[str, str] | None:
        """The first claim outside this binding, as (field, reason), or None."""
        for dimension, allowed in (("app", self.apps), ("tenant", self.tenants)):
            if not allowed:
                continue
            value = attribution.dimensions.get(dimension)
            if value is None:
                return dimension, f"this key must name its {dimension} (one of {sorted(allowed)})"
            if value not in allowed:
                return dimension, f"this key may not claim {dimension} {value!r} (allowed: {sorted(allowed)})"
        if not self.bound:
            return None
        for tag in attribution.tags:
            key = tag.split(":", 1)[0] if ":" in tag else ""
            if key in ("app", "tenant") and (self.apps if key == "app" else self.tenants):
                continue
            if tag not in self.tags and f"{key}:*" not in self.tags:
                return "tags", f"this key may not claim tag {tag!r} (allowed: {sorted(self.tags) or 'none'})"
        return None


@dataclass(frozen=True)
class ApiKey:
    """A key as the API knows it: never the secret itself."""

    key_id: str
    scope: Scope
    name: str = ""
    binding: Binding = field(default_factory=Binding)
    events_per_s: float = 0.0  # 0: the service's default limit


def valid_tag_pattern(pattern: str) -> bool:
    key, sep, value = pattern.partition(":")
    return bool(sep and key and value) and (value == "*" or "*" not in value)
