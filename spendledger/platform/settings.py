"""One frozen settings object per process, from `SPENDLEDGER_*` environment variables and `.env`.

Built once in `main` and passed down; nothing reads the environment at import time. Each server process
has a class of its own, so the type checker shows what it reads; a group two processes read is a base
of both. Every class reads the same variables (one prefix, no aliases), with the same defaults and checks:

    CommonSettings          Kafka, consumer-group timeouts, logging, gc      every process
      ClickHouseSettings    the ledger's database                            API, sink
        SinkSettings        the sink's batches and health port               sink (and the API's EMBEDDED_SINK)
      LedgerRulesSettings   skew, tags, prices, budget zone, destinations    API, worker
    ApiSettings(SinkSettings, LedgerRulesSettings)                           `spendledger api`
    WorkerSettings(LedgerRulesSettings)                                      `spendledger worker`
    Settings(WorkerSettings, ApiSettings): all of them, and the entry points' own (`up`, `sql`, ...)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from ledger.budgets import HistoryPolicy
from ledger.join import JoinTimeouts
from ledger.tags import AttributionPolicy
from schemas.topics import Topics

_DESTINATION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DestinationName = Annotated[str, StringConstraints(pattern=_DESTINATION_NAME)]


class AlertDestination(BaseModel):
    """Where budget alerts are delivered (`ALERT_DESTINATIONS`). The URL and the signing key are
    secrets (a Slack webhook's URL is its key): they never reach Kafka, ClickHouse, logs or errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: SecretStr
    format: Literal["json", "slack"] = "json"
    secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key that signs each delivery")
    default: bool = Field(default=False, description="gets every alert, not only those of budgets naming it")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        try:
            parts = urlsplit(value.get_secret_value())
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # e.g. a bad port
            usable = False
        if not usable:  # the message must not quote the URL
            raise ValueError("url must be an http:// or https:// URL with a host")
        return value

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("secret must not be empty (leave it out for unsigned deliveries)")
        return value


class CommonSettings(BaseSettings):
    """What every server process reads: Kafka, its consumer groups' timeouts, logging, the garbage collector."""

    # hide_input_in_errors: a rejected value is never quoted back (it may be a key or a webhook URL).
    # Every class below inherits this one configuration: the same variables, `.env` and prefix.
    model_config = SettingsConfigDict(
        env_prefix="SPENDLEDGER_", env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = ""
    topic_partitions: int = Field(default=4, ge=1, le=256)
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_security: dict[str, str] = Field(
        default_factory=dict, description="extra librdkafka settings, e.g. sasl.mechanism", repr=False
    )  # (it may hold sasl.password: never in a repr)

    # Consumer-group timeouts, the worker's (Faust) and the sink's (joins take ~30 s with the defaults
    # against Tansu; ~3 s with these).
    broker_session_timeout_s: float = 6.0
    broker_heartbeat_interval_s: float = 1.0

    log_level: str = Field(default="WARNING", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    gc_thresholds: tuple[int, int, int] = Field(
        default=(50_000, 50, 100),
        description="the services' garbage-collector thresholds (Python's own are 700, 10, 10); "
        "e.g. [700,10,10]",
    )

    @field_validator("gc_thresholds")
    @classmethod
    def _gc(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError("garbage-collector thresholds are positive, e.g. [50000,50,100]")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration for a client of this cluster."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_security, **extra}


class ClickHouseSettings(CommonSettings):
    """The ledger's database: the API and the sink (and `migrate`, `restore`) open it; the worker does not."""

    clickhouse_dsn: SecretStr = SecretStr("chdb://./.spendledger/clickhouse")
    clickhouse_database: str = Field(default="spend", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @property
    def is_embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.get_secret_value().startswith("chdb://")

    @property
    def is_relayed_clickhouse(self) -> bool:
        """The engine is another process's, reached through its relay (the embedded system's sink)."""
        return self.clickhouse_dsn.get_secret_value().startswith("relay://")


class LedgerRulesSettings(CommonSettings):
    """What the API and the worker must apply alike: an event's time bounds, its tags and pseudonyms, its
    prices, the budgets' time zone and alert destinations (the API checks a budget's names against them)."""

    max_future_skew_s: float = Field(
        default=300.0,
        ge=0,
        le=7 * 86_400,
        description="how far after its receipt an event's occurred_at may be (producers' clocks run ahead)",
    )
    price_overrides_file: Path | None = None
    user_id_hmac_key: SecretStr | None = None
    max_tags: int = Field(default=50, ge=1)

    # Budgets
    budget_timezone: str = Field(
        default="UTC", description="IANA zone where day, week and month windows start"
    )

    # Alert delivery (processors/alerts.py, docs/budgets.md, "Alert delivery"); the API reads the names only
    alert_destinations: Annotated[dict[DestinationName, AlertDestination], NoDecode] = Field(
        default_factory=dict,
        description='JSON: {"<name>": {"url", "format": "json"|"slack", "secret", "default"}}',
    )

    @field_validator("alert_destinations", mode="before")
    @classmethod
    def _destinations_json(cls, value: Any) -> Any:
        # From the environment or `.env` a JSON string (NoDecode: parsed here, so a syntax error is a
        # ValidationError naming the setting, with a position and never the text).
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected "
                    '{"<name>": {"url": "https://…", "format": "json", "secret": "…", "default": true}}'
                ) from None
        if isinstance(value, dict):
            # Names and field names are checked here, where an error can leave them out: a URL put
            # where a name goes would be quoted back by the field's own checks.
            fields = set(AlertDestination.model_fields)
            for number, (name, entry) in enumerate(value.items(), 1):
                if not isinstance(name, str) or not re.fullmatch(_DESTINATION_NAME, name):
                    raise ValueError(
                        f"destination {number}: a name is 1 to 64 of A-Z a-z 0-9 _ . - "
                        "(the name is not shown: it may be a URL)"
                    )
                if isinstance(entry, dict) and set(entry) - fields:
                    raise ValueError(
                        f"destination {name!r}: unknown fields (not shown); the fields are "
                        "url, format, secret and default"
                    )
        return value

    @field_validator("budget_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as 'Europe/Berlin')"
            ) from exc
        return value

    def attribution_policy(self) -> AttributionPolicy:
        key = self.user_id_hmac_key.get_secret_value().encode() if self.user_id_hmac_key else None
        return AttributionPolicy(max_tags=self.max_tags, user_id_hmac_key=key or None)


class SinkSettings(ClickHouseSettings):
    """The sink's: the `sink` process's, and the API's, whose process runs the sink as a thread with
    `EMBEDDED_SINK` (ApiSettings holds these)."""

    # Where the API listens; the `sink` process's health server listens there too (on SINK_PORT).
    api_host: str = "127.0.0.1"
    sink_port: int = Field(default=6067, ge=0, le=65535)
    sink_batch_max: int = Field(default=5000, ge=1)
    sink_flush_interval_s: float = Field(default=0.5, gt=0)
    sink_dedupe_lookback_s: float = Field(
        default=86_400.0,
        ge=0,
        description="how far before a batch's events the sink looks for their event ids",
    )


class ApiSettings(SinkSettings, LedgerRulesSettings):
    """The API's process (`spendledger api`): the API, its budget guard, and the sink where it hosts it."""

    # ClickHouse's analyst user, whom /v1/sql runs as (`migrate` creates it)
    clickhouse_analyst_user: str = Field(
        default="spendledger_analyst",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="server mode: the ClickHouse user /v1/sql runs as (SELECT on the ledger's database only)",
    )
    clickhouse_analyst_password: SecretStr | None = Field(
        default=None,
        description="server mode: `migrate` creates the analyst user with it and the API connects as it; "
        "unset, /v1/sql answers 503 against a ClickHouse server",
    )

    # API
    producer_keys: SecretStr = SecretStr("")
    analyst_keys: SecretStr = SecretStr("")
    admin_keys: SecretStr = SecretStr("")
    keys_refresh_s: float = Field(
        default=2.0, gt=0, description="how soon a key created or revoked on another API instance counts here"
    )
    key_events_per_s: float = Field(
        default=20_000.0, ge=0, description="events per second one key may send (bursts of 2 s); 0: no limit"
    )
    metrics_public: bool = Field(
        default=False,
        description="serve /metrics to anyone; otherwise loopback clients or analyst/admin keys",
    )
    api_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    ingest_processes: int = Field(
        default=1, ge=0, le=64, description="processes that parse and check events (0: a thread of the API)"
    )
    api_switch_interval_s: float = Field(
        default=0.0005, gt=0, le=0.1, description="the API's sys.setswitchinterval (Python's default: 0.005)"
    )
    max_event_bytes: int = Field(
        default=900_000,
        ge=1024,
        description="one event's size as published; keep it under the brokers' message.max.bytes (1 MB by default)",
    )
    publish_timeout_s: float = Field(default=5.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    sql_max_rows: int = Field(default=10_000, ge=1)
    sql_max_seconds: int = Field(default=15, ge=1)
    sql_max_memory_bytes: int = Field(default=512 * 1024**2, ge=1024**2)
    sql_max_result_bytes: int = Field(
        default=16 * 1024**2, ge=1024, description="the most a /v1/sql result may hold, counted as JSON"
    )
    sql_max_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="SQL queries one API instance runs at once (threads and connections of their own)",
    )
    coverage_dimensions: str = Field(
        default="team,env,feature", description="dimensions /v1/analytics/coverage measures by default"
    )
    coverage_alert_pct: Decimal = Field(default=Decimal(95), ge=0, le=100)
    report_max_groups: int = Field(default=10_000, ge=1, description="groups a report lists at most")
    embedded_sink: bool = Field(default=False, description="run the sink as a thread of the API's process")
    clickhouse_relay: SecretStr | None = Field(
        default=None,
        description="embedded: lend the API's chDB engine to a sink process at this relay DSN "
        "(relay://:TOKEN@127.0.0.1:PORT, spendledger.platform.chdb_relay)",
    )
    journal_dir: Path | None = Field(
        default=None,
        description="where the API keeps every acknowledged event until it lands (the embedded system "
        "sets it: its broker keeps nothing across a restart)",
    )
    journal_prune_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="how often the API closes a journal segment and deletes those that landed",
    )
    journal_settle_s: float = Field(
        default=60.0,
        ge=0,
        description="how long a segment's events stay landed before it is deleted (ClickHouse writes without "
        "fsync; the kernel's writeback runs every 30 s)",
    )
    api_drain_grace_s: float = Field(
        default=2.0,
        ge=0,
        description="on SIGTERM the API answers 503 to new events for this long before it stops",
    )

    # Budgets (no code reads it: kept, so that the variable is still accepted and checked)
    guard_bootstrap_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _distinct_scopes(self) -> ApiSettings:
        lists = {"producer": self.producer_keys, "analyst": self.analyst_keys, "admin": self.admin_keys}
        seen: dict[str, str] = {}
        for scope, keys in lists.items():
            for key in _split(keys):
                if seen.setdefault(key, scope) != scope:
                    raise ValueError(
                        f"a key is listed as both {seen[key]} and {scope} key; scopes must differ"
                    )
        return self

    def producer_key_list(self) -> list[str]:
        return _split(self.producer_keys)

    def analyst_key_list(self) -> list[str]:
        return _split(self.analyst_keys)

    def admin_key_list(self) -> list[str]:
        return _split(self.admin_keys)


class WorkerSettings(LedgerRulesSettings):
    """The Faust worker's (`spendledger worker`): the join, attribution, budgets and alert delivery."""

    # Processors
    worker_web_port: int = Field(default=6066, ge=0, le=65535)
    worker_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="the worker's niceness: where it shares cores with an API, the API's /v1/check goes first",
    )
    worker_web_host: str = Field(
        default="127.0.0.1", description="where the worker's web server (metrics, Faust's pages) listens"
    )
    worker_data_dir: Path | None = Field(
        default=None, description="Faust's data directory (default: `<app id>-data` in the working directory)"
    )
    request_timeout_s: float = Field(default=600.0, gt=0)
    usage_wait_s: float = Field(default=10.0, gt=0)
    join_done_retention_s: float = Field(default=600.0, gt=0)
    join_sweep_interval_s: float = Field(default=1.0, gt=0)
    batch_max_events: int = Field(default=2000, ge=1)
    batch_within_s: float = Field(default=0.02, gt=0)
    worker_fetch_wait_ms: int = Field(default=50, ge=10, le=1500)
    worker_stall_timeout_s: float = Field(
        default=60.0,
        ge=5,
        description="a worker whose streams have messages waiting and that took none in for this long "
        "(outside a rebalance) exits, for its supervisor to start a fresh one",
    )
    # Faust's, beside the consumer-group timeouts (CommonSettings)
    broker_rebalance_timeout_s: float = 5.0

    # Budgets
    budget_dedupe_s: float = Field(
        default=300.0, ge=120, description="how long event ids are kept for dedupe"
    )
    budget_tick_interval_s: float = Field(default=1.0, gt=0)

    # Alert delivery (processors/alerts.py, docs/budgets.md, "Alert delivery")
    alert_delivery_attempts: int = Field(default=6, ge=1, le=20)
    alert_delivery_timeout_s: float = Field(default=5.0, gt=0, le=60, description="one attempt, in all")
    alert_delivery_backoff_s: float = Field(
        default=0.5, gt=0, description="the wait after a first failed attempt; doubles after each"
    )
    alert_delivery_backoff_max_s: float = Field(
        default=8.0, gt=0, description="the longest wait between attempts (a Retry-After too)"
    )
    alert_delivery_deadline_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="an alert's delivery to one destination ends within this; no attempt starts that could not",
    )
    alert_delivery_max_age_s: float = Field(
        default=3600.0, ge=0, description="an older alert is recorded as not sent (0: no limit)"
    )

    @model_validator(mode="after")
    def _alert_delivery(self) -> WorkerSettings:
        if self.alert_delivery_backoff_max_s < self.alert_delivery_backoff_s:
            raise ValueError("ALERT_DELIVERY_BACKOFF_MAX_S must be at least ALERT_DELIVERY_BACKOFF_S")
        if self.alert_delivery_deadline_s < self.alert_delivery_timeout_s:
            raise ValueError("ALERT_DELIVERY_DEADLINE_S must be at least ALERT_DELIVERY_TIMEOUT_S")
        return self

    def history_policy(self) -> HistoryPolicy:
        return HistoryPolicy(tz=ZoneInfo(self.budget_timezone), dedupe_ms=int(self.budget_dedupe_s * 1000))

    def join_timeouts(self) -> JoinTimeouts:
        return JoinTimeouts(
            request_timeout_ms=int(self.request_timeout_s * 1000),
            usage_wait_ms=int(self.usage_wait_s * 1000),
            done_retention_ms=int(self.join_done_retention_s * 1000),
        )


# The worker's class first: the model validators then run as they always have (the API's key lists, then
# alert delivery), for the same error where both are wrong.
class Settings(WorkerSettings, ApiSettings):
    """Every setting of every process, for the entry points: `up` hands one environment to every child and
    checks it whole first; `sql`, `keys`, `demo`, `migrate` and `restore` read across the processes."""

    # Read by the entry points only
    api_url: str | None = None
    drain_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="how long `up` waits on Ctrl-C for everything acknowledged to land before it stops",
    )
    worker_processes: int = Field(
        default=1, ge=1, le=64, description="Faust workers `spendledger up` starts (one consumer group)"
    )


def settings_in(env: Mapping[str, str]) -> Settings:
    """The settings a process started with this environment reads (no `.env`), decoded as pydantic-settings
    decodes its own environment: JSON values (`KAFKA_SECURITY`, `GC_THRESHOLDS`) included."""

    class Given(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            # (what pydantic-settings reads from os.environ; tests/unit/test_embedded_settings.py holds it)
            return {name if self.case_sensitive else name.lower(): value for name, value in env.items()}

    class InEnv(Settings):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], *_: Any, **__: Any
        ) -> tuple[Any, ...]:
            return (Given(settings_cls),)

    return InEnv()


def _split(keys: SecretStr) -> list[str]:
    return [k.strip() for k in keys.get_secret_value().split(",") if k.strip()]
