"""Each server process reads a settings class of its own (spendledger.platform.settings): the API
`ApiSettings`, the worker `WorkerSettings`, the sink `SinkSettings`; `Settings` holds them all for the
entry points. Every class reads the same variables as `Settings`, with its defaults and its checks."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from spendledger.platform.settings import (
    ApiSettings,
    ClickHouseSettings,
    CommonSettings,
    LedgerRulesSettings,
    Settings,
    SinkSettings,
    WorkerSettings,
)

PROCESSES = {"api": ApiSettings, "worker": WorkerSettings, "sink": SinkSettings}
PARTS = [CommonSettings, ClickHouseSettings, LedgerRulesSettings, SinkSettings, ApiSettings, WorkerSettings]
ENTRY_POINTS_ONLY = {"api_url", "drain_timeout_s", "worker_processes"}  # `up`, and `sql`/`keys`/`demo`

# A valid value unlike the default for every setting, as the environment holds it.
SAMPLES = {
    # CommonSettings
    "kafka_bootstrap": "broker-1:9094,broker-2:9094",
    "topic_prefix": "staging-",
    "topic_partitions": "12",
    "kafka_replication_factor": "3",
    "kafka_security": '{"security.protocol": "SASL_SSL", "sasl.password": "s3cret"}',
    "broker_session_timeout_s": "10",
    "broker_heartbeat_interval_s": "2",
    "log_level": "info",
    "gc_thresholds": "[700,10,10]",
    # ClickHouseSettings
    "clickhouse_dsn": "http://ledger:pw@clickhouse:8123",
    "clickhouse_database": "ledger",
    # LedgerRulesSettings
    "max_future_skew_s": "60",
    "price_overrides_file": "/etc/spendledger/prices.json",
    "user_id_hmac_key": "pseudonym-key",
    "max_tags": "7",
    "budget_timezone": "Europe/Berlin",
    "alert_destinations": '{"ops": {"url": "https://hooks.example/ops", "format": "slack", "default": true}}',
    # SinkSettings
    "api_host": "10.0.0.5",
    "sink_port": "7067",
    "sink_batch_max": "100",
    "sink_flush_interval_s": "1.5",
    "sink_dedupe_lookback_s": "3600",
    # ApiSettings
    "clickhouse_analyst_user": "analyst",
    "clickhouse_analyst_password": "analyst-pw",
    "producer_keys": "p1, p2",
    "analyst_keys": "a1",
    "admin_keys": "x1",
    "keys_refresh_s": "5",
    "key_events_per_s": "100",
    "metrics_public": "true",
    "api_port": "8080",
    "max_body_bytes": "2048",
    "ingest_processes": "2",
    "api_switch_interval_s": "0.005",
    "max_event_bytes": "4096",
    "publish_timeout_s": "3",
    "retry_after_s": "9",
    "sql_max_rows": "50",
    "sql_max_seconds": "3",
    "sql_max_memory_bytes": str(2 * 1024**2),
    "sql_max_result_bytes": "4096",
    "sql_max_concurrency": "4",
    "coverage_dimensions": "team,env",
    "coverage_alert_pct": "90.5",
    "report_max_groups": "20",
    "embedded_sink": "true",
    "clickhouse_relay": "relay://:token@unix/tmp/relay.sock",
    "journal_dir": "/var/lib/spendledger/journal",
    "journal_prune_interval_s": "10",
    "journal_settle_s": "0",
    "api_drain_grace_s": "0.5",
    "guard_bootstrap_timeout_s": "3",
    # WorkerSettings
    "worker_web_port": "7066",
    "worker_nice": "5",
    "worker_web_host": "10.0.0.6",
    "worker_data_dir": "/var/lib/spendledger/worker",
    "request_timeout_s": "60",
    "usage_wait_s": "2",
    "join_done_retention_s": "120",
    "join_sweep_interval_s": "0.5",
    "batch_max_events": "100",
    "batch_within_s": "0.05",
    "worker_fetch_wait_ms": "100",
    "worker_stall_timeout_s": "30",
    "broker_rebalance_timeout_s": "7",
    "budget_dedupe_s": "600",
    "budget_tick_interval_s": "2",
    "alert_delivery_attempts": "3",
    "alert_delivery_timeout_s": "2",
    "alert_delivery_backoff_s": "1",
    "alert_delivery_backoff_max_s": "4",
    "alert_delivery_deadline_s": "20",
    "alert_delivery_max_age_s": "60",
    # Settings: the entry points'
    "api_url": "http://ledger.internal:8000",
    "drain_timeout_s": "30",
    "worker_processes": "2",
}


pytestmark = pytest.mark.usefixtures("no_settings")


def fields(cls: type[CommonSettings]) -> set[str]:
    return set(cls.model_fields)


def set_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)


def test_every_setting_is_a_process_s_or_an_entry_point_s() -> None:
    read_by_processes = set().union(*(fields(cls) for cls in PROCESSES.values()))
    assert read_by_processes | ENTRY_POINTS_ONLY == fields(Settings)
    assert not read_by_processes & ENTRY_POINTS_ONLY
    assert fields(Settings) - fields(ApiSettings) - fields(WorkerSettings) == ENTRY_POINTS_ONLY


def test_what_two_processes_share_is_a_base_of_both() -> None:
    assert fields(ApiSettings) & fields(WorkerSettings) == fields(LedgerRulesSettings)
    assert fields(WorkerSettings) & fields(SinkSettings) == fields(CommonSettings)
    # The API's process runs the sink as a thread with EMBEDDED_SINK: it has all the sink's settings.
    assert fields(ApiSettings) & fields(SinkSettings) == fields(SinkSettings)
    assert fields(CommonSettings) == {
        "kafka_bootstrap", "topic_prefix", "topic_partitions", "kafka_replication_factor", "kafka_security",
        "broker_session_timeout_s", "broker_heartbeat_interval_s", "log_level", "gc_thresholds",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("field", "cls"),
    [
        ("sql_max_rows", WorkerSettings),
        ("sql_max_rows", SinkSettings),
        ("producer_keys", WorkerSettings),
        ("clickhouse_dsn", WorkerSettings),
        ("sink_batch_max", WorkerSettings),
        ("worker_nice", ApiSettings),
        ("alert_delivery_attempts", ApiSettings),
        ("budget_dedupe_s", ApiSettings),
        ("max_tags", SinkSettings),
        ("worker_processes", WorkerSettings),
        ("api_url", ApiSettings),
    ],
)
def test_a_process_has_no_setting_of_another(field: str, cls: type[CommonSettings]) -> None:
    assert field in Settings.model_fields
    assert field not in cls.model_fields


@pytest.mark.parametrize("cls", PARTS, ids=lambda cls: cls.__name__)
def test_the_same_variables_defaults_and_checks(cls: type[CommonSettings]) -> None:
    assert cls.model_config == Settings.model_config
    for name, field in cls.model_fields.items():
        assert (field.alias, field.validation_alias) == (None, None), name
        assert repr(field) == repr(Settings.model_fields[name]), name


def test_the_samples_cover_every_setting_and_are_not_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(SAMPLES) == fields(Settings)
    defaults = Settings()
    set_samples(monkeypatch)
    sampled = Settings()
    assert [name for name in SAMPLES if getattr(sampled, name) == getattr(defaults, name)] == []


def derived(settings: Any) -> dict[str, Any]:
    """What the code builds from the settings, where the class has it."""
    reads = {
        "topics": lambda s: s.topics,
        "kafka_config": lambda s: s.kafka_config(),
        "is_embedded_clickhouse": lambda s: s.is_embedded_clickhouse,
        "is_relayed_clickhouse": lambda s: s.is_relayed_clickhouse,
        "attribution_policy": lambda s: s.attribution_policy(),
        "history_policy": lambda s: s.history_policy(),
        "join_timeouts": lambda s: s.join_timeouts(),
        "producer_key_list": lambda s: (s.producer_key_list(), s.analyst_key_list(), s.admin_key_list()),
    }
    return {name: read(settings) for name, read in reads.items() if hasattr(type(settings), name)}


@pytest.mark.parametrize("source", ["environment", ".env"])
@pytest.mark.parametrize("cls", PARTS, ids=lambda cls: cls.__name__)
def test_each_class_reads_what_settings_reads(
    monkeypatch: pytest.MonkeyPatch, no_settings: Path, cls: type[CommonSettings], source: str
) -> None:
    if source == "environment":
        set_samples(monkeypatch)
    else:
        (no_settings / ".env").write_text(
            "".join(f"SPENDLEDGER_{field.upper()}='{value}'\n" for field, value in SAMPLES.items())
        )
    whole, part = Settings(), cls()
    assert {name: getattr(part, name) for name in cls.model_fields} == {
        name: getattr(whole, name) for name in cls.model_fields
    }
    built = derived(part)
    assert built == {name: value for name, value in derived(whole).items() if name in built}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("topic_partitions", "0"),
        ("kafka_security", "not json"),
        ("log_level", "verbose"),
        ("gc_thresholds", "[0,10,10]"),
        ("clickhouse_database", "spend-ledger"),
        ("budget_timezone", "Mars/Olympus_Mons"),
        ("alert_destinations", '{"ops": {"url": "ftp://hooks.example"}}'),
        ("alert_destinations", "{"),
        ("max_tags", "0"),
        ("sink_batch_max", "0"),
        ("sql_max_rows", "0"),
        ("budget_dedupe_s", "60"),
    ],
)
def test_a_value_settings_refuses_each_class_with_the_setting_refuses(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    with pytest.raises(ValueError, match=field) as whole:  # JSON that does not parse: a SettingsError
        Settings()
    readers = [cls for cls in PARTS if field in cls.model_fields]
    assert readers
    for cls in readers:
        with pytest.raises(ValueError, match=field) as part:
            cls()
        assert type(part.value) is type(whole.value)


@pytest.mark.parametrize(
    ("variables", "refused_by"),
    [
        ({"PRODUCER_KEYS": "k1", "ADMIN_KEYS": "k1"}, {ApiSettings}),
        ({"ALERT_DELIVERY_BACKOFF_S": "10", "ALERT_DELIVERY_BACKOFF_MAX_S": "5"}, {WorkerSettings}),
        ({"ALERT_DELIVERY_TIMEOUT_S": "40", "ALERT_DELIVERY_DEADLINE_S": "30"}, {WorkerSettings}),
    ],
)
def test_a_check_across_settings_is_made_by_the_process_that_reads_them(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], refused_by: set[type[CommonSettings]]
) -> None:
    """`up` (Settings) still refuses such an environment before it starts anything; a process started
    on its own refuses it only where the variables are its own."""
    for name, value in variables.items():
        monkeypatch.setenv(f"SPENDLEDGER_{name}", value)
    with pytest.raises(ValidationError):
        Settings()
    for cls in PROCESSES.values():
        if cls in refused_by:
            with pytest.raises(ValidationError):
                cls()
        else:
            cls()


def test_where_both_checks_fail_settings_names_the_same_one_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model validators run in their old order (the key lists, then alert delivery)."""
    for name, value in {"PRODUCER_KEYS": "k1", "ADMIN_KEYS": "k1", "ALERT_DELIVERY_BACKOFF_S": "10"}.items():
        monkeypatch.setenv(f"SPENDLEDGER_{name}", value)
    with pytest.raises(ValidationError, match="scopes must differ"):
        Settings()


@pytest.mark.parametrize(
    ("command", "module", "runner", "another_process_s"),
    [
        ("api", "spendledger.services", "run_api", "ALERT_DELIVERY_ATTEMPTS"),
        ("worker", "processors.app", "run_worker", "SQL_MAX_ROWS"),
        ("sink", "spendledger.services", "run_sink", "MAX_TAGS"),
    ],
)
def test_each_server_command_reads_its_own_settings(
    monkeypatch: pytest.MonkeyPatch, command: str, module: str, runner: str, another_process_s: str
) -> None:
    """`spendledger api|worker|sink` builds its process's class: a bad value of a variable only another
    process reads does not stop it (`up` and the other commands still refuse it)."""
    import importlib

    from spendledger import cli

    ran: list[Any] = []
    monkeypatch.setattr(importlib.import_module(module), runner, ran.append)
    monkeypatch.setattr("spendledger.platform.logs.configure", lambda level: None)
    monkeypatch.setattr("spendledger.platform.runtime.tune_gc", lambda thresholds: None)
    monkeypatch.setenv(f"SPENDLEDGER_{another_process_s}", "0")
    monkeypatch.setenv("SPENDLEDGER_TOPIC_PREFIX", "staging-")
    assert cli.main([command]) == 0
    assert [type(settings) for settings in ran] == [PROCESSES[command]]
    assert ran[0].topic_prefix == "staging-"
    assert cli.main(["migrate"]) == 2  # Settings: every variable


def test_up_reads_its_childrens_environment_as_each_child_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` knows its children's settings from the environment it hands them (`settings_in`): every
    variable decoded as a child decodes it, JSON values included (`Settings.model_validate` of the raw
    strings refused KAFKA_SECURITY and GC_THRESHOLDS, so `up` could not start with either set)."""
    from spendledger.platform.settings import settings_in

    env = {f"SPENDLEDGER_{field.upper()}": value for field, value in SAMPLES.items()}
    set_samples(monkeypatch)
    child = Settings()
    given = settings_in({**env, "PATH": "/bin", "spendledger_max_tags": "9"})
    assert given.model_dump() == {**child.model_dump(), "max_tags": 9}  # names read as a child reads them
    assert given.kafka_config() == child.kafka_config() and given.gc_thresholds == child.gc_thresholds
    from pydantic_settings import SettingsError

    monkeypatch.setenv("SPENDLEDGER_KAFKA_SECURITY", "not json")
    for read in (Settings, lambda: settings_in({"SPENDLEDGER_KAFKA_SECURITY": "not json"})):
        with pytest.raises(SettingsError, match="kafka_security"):  # refused alike
            read()


def test_the_embedded_system_reads_json_settings_from_the_environment_it_hands_its_children(
    tmp_path: Path,
) -> None:
    from spendledger.embedded import EmbeddedSystem

    env = {"SPENDLEDGER_KAFKA_SECURITY": '{"client.id": "ledger"}', "SPENDLEDGER_GC_THRESHOLDS": "[1000,5,5]"}
    system = EmbeddedSystem(data_dir=tmp_path, say=lambda _: None)
    system.child_env = env  # as `start` leaves it (with its broker's and data dir's settings added)
    settings = system.settings()
    assert settings.kafka_config()["client.id"] == "ledger" and settings.gc_thresholds == (1000, 5, 5)
