"""API keys: the environment's, and those created through `/v1/keys` (stored hashed in ClickHouse).

A key is `sl_<scope>_<43 random characters>`; only its SHA-256 is kept (the keys are random,
so a plain hash is enough). The ring answers a look-up from memory; keys created or
revoked on another API instance reach this one within `refresh_s`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from ledger.scopes import ApiKey, Binding, Scope

log = logging.getLogger(__name__)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(scope: Scope) -> tuple[str, str]:
    """A fresh (key_id, key)."""
    return f"key_{secrets.token_hex(6)}", f"sl_{scope}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class StoredKey:
    """A row of `api_keys`: the hash, never the key."""

    key: ApiKey
    key_hash: str
    created_at: datetime
    revoked_at: datetime | None = None


class KeyStore(Protocol):
    def save(self, stored: StoredKey) -> None: ...

    def load(self) -> list[StoredKey]: ...


class MemoryKeyStore:
    """A twin of the ClickHouse store for component tests."""

    def __init__(self) -> None:
        self.rows: dict[str, StoredKey] = {}

    def save(self, stored: StoredKey) -> None:
        self.rows[stored.key.key_id] = stored

    def load(self) -> list[StoredKey]:
        return list(self.rows.values())


class ClickHouseKeyStore:
    """`api_keys` (ReplacingMergeTree by key_id): a revocation is a newer version of the row."""

    _COLUMNS = (
        "key_id",
        "key_hash",
        "scope",
        "name",
        "apps",
        "tenants",
        "tags",
        "events_per_s",
        "created_at",
        "revoked_at",
        "version",
    )

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()  # one clickhouse-connect client is not safe across threads

    def save(self, stored: StoredKey) -> None:
        k = stored.key
        row = [
            k.key_id,
            stored.key_hash,
            k.scope,
            k.name,
            sorted(k.binding.apps),
            sorted(k.binding.tenants),
            sorted(k.binding.tags),
            int(k.events_per_s),
            stored.created_at,
            stored.revoked_at,
            time.time_ns(),
        ]
        with self._lock:
            self._client.insert("api_keys", [row], column_names=list(self._COLUMNS))

    def load(self) -> list[StoredKey]:
        with self._lock:
            result = self._client.query(_SELECT_KEYS)
        out = []
        for key_id, hashed, scope, name, apps, tenants, tags, rate, created, revoked in result.result_rows:
            key = ApiKey(key_id, scope, name, Binding.of(apps, tenants, tags), float(rate))
            out.append(StoredKey(key, hashed, _utc(created), _utc(revoked) if revoked else None))
        return out


# A key never changes but for its revocation, and a revocation sticks: any revoked row revokes it,
# whatever the versions (hosts' clocks) say.
_SELECT_KEYS = (
    "SELECT key_id, any(key_hash), any(scope), any(name), any(apps), any(tenants), any(tags), "
    "any(events_per_s), min(created_at), max(revoked_at) FROM api_keys GROUP BY key_id"
)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class KeyRing:
    """Every key the API accepts, by hash: the environment's (unbound) and the stored ones."""

    def __init__(
        self, environment: dict[Scope, Iterable[str]], store: KeyStore | None = None, refresh_s: float = 2.0
    ) -> None:
        self._env: dict[str, ApiKey] = {}
        for scope, keys in environment.items():
            for n, key in enumerate(keys):
                self._env[key_hash(key)] = ApiKey(f"env:{scope}:{n}", scope)
        self._store = store
        self._stored: dict[str, StoredKey] = {}
        self._lock = threading.Lock()
        self._refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> KeyRing:
        """Load the stored keys, then keep them fresh in the background."""
        if self._store is None:
            return self
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="key-ring", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.refresh()

    def refresh(self) -> None:
        if self._store is None:
            return
        try:
            rows = self._store.load()
        except Exception as exc:  # the store may be down: keep what is known
            log.warning("cannot load the API keys; keeping the last known ones: %s", type(exc).__name__)
            return
        with self._lock:
            self._stored = {row.key_hash: row for row in rows}

    def find(self, key: str) -> ApiKey | None:
        hashed = key_hash(key)
        found = self._env.get(hashed)
        if found is not None:
            return found
        stored = self._stored.get(hashed)
        if stored is None or stored.revoked_at is not None:
            return None
        return stored.key

    def create(self, key: ApiKey, now: datetime) -> tuple[StoredKey, str]:
        """Store a new key; returns its row and the key itself (the only time it is shown)."""
        if self._store is None:
            raise RuntimeError("no key store")
        key_id, secret = new_key(key.scope)
        stored = StoredKey(
            ApiKey(key_id, key.scope, key.name, key.binding, key.events_per_s), key_hash(secret), now
        )
        self._store.save(stored)
        with self._lock:
            self._stored[stored.key_hash] = stored
        return stored, secret

    def revoke(self, key_id: str, now: datetime) -> StoredKey | None:
        if self._store is None:
            return None
        self.refresh()
        with self._lock:
            found = next((row for row in self._stored.values() if row.key.key_id == key_id), None)
        if found is None:
            return None
        if found.revoked_at is None:
            found = StoredKey(found.key, found.key_hash, found.created_at, now)
            self._store.save(found)
            with self._lock:
                self._stored[found.key_hash] = found
        return found

    def listing(self) -> list[dict[str, Any]]:
        """Every key, without secrets or hashes: the environment's first, then the stored ones by age."""
        out: list[dict[str, Any]] = [
            {"key_id": k.key_id, "scope": k.scope, "source": "environment"} for k in self._env.values()
        ]
        with self._lock:
            stored = sorted(self._stored.values(), key=lambda row: row.created_at)
        out += [describe(row) for row in stored]
        return out


def describe(row: StoredKey) -> dict[str, Any]:
    k = row.key
    return {
        "key_id": k.key_id,
        "scope": k.scope,
        "source": "api",
        "name": k.name,
        "apps": sorted(k.binding.apps),
        "tenants": sorted(k.binding.tenants),
        "tags": sorted(k.binding.tags),
        "events_per_s": k.events_per_s or None,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


class RateLimiter:
    """A token bucket of events per key: `rate` per second, holding up to `burst_s` seconds' worth.

    A request is admitted while its key's bucket holds a whole token, and charged after it was
    read: its events, or for a refused one an estimate from its size. A batch larger than the
    bucket puts the key in debt until the rate has paid it back."""

    def __init__(self, rate: float, burst_s: float = 2.0) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self._buckets: dict[str, tuple[float, float]] = {}  # key_id -> (tokens, at)
        self._lock = threading.Lock()

    def limit_of(self, key: ApiKey) -> float:
        """The key's events per second (0: no limit)."""
        return key.events_per_s or self.rate

    def _refilled(self, key: ApiKey, rate: float, now: float) -> float:
        capacity = max(1.0, rate * self.burst_s)
        tokens, at = self._buckets.get(key.key_id, (capacity, now))
        return min(capacity, tokens + (now - at) * rate)

    def admit(self, key: ApiKey, now: float | None = None) -> float:
        """0.0 when the key may send now, else the seconds until it may."""
        rate = self.limit_of(key)
        if rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._refilled(key, rate, now)
            self._buckets[key.key_id] = (tokens, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / rate

    def charge(self, key: ApiKey, n: int, now: float | None = None) -> None:
        rate = self.limit_of(key)
        if rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._buckets[key.key_id] = (self._refilled(key, rate, now) - n, now)
