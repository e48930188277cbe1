"""The client's guard settings (`spendledger.guard.GuardSettings`) read the server's variables, with the
server's defaults: a gateway's guard reads the server's budget-block topic with the server's Kafka
options and normalizes tags with the server's policy, without importing the server's settings."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spendledger import guard as guard_module
from spendledger.guard import BudgetGuard, GuardSettings
from spendledger.integrations import litellm as plugin
from spendledger.platform.settings import Settings
from spendledger.sdk import budget_guard

# A value unlike the default for every server setting the guard depends on, as the environment holds it.
SAMPLES = {
    "kafka_bootstrap": "broker-1:9094,broker-2:9094",
    "topic_prefix": "staging-",
    "kafka_security": json.dumps(
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "gateway",
            "sasl.password": "s3cret",
            "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
            "ssl.endpoint.identification.algorithm": "https",
        }
    ),
    "user_id_hmac_key": "pseudonym-key",
    "max_tags": "7",
}


pytestmark = pytest.mark.usefixtures("no_settings")


def what_the_guard_gets(settings: Any) -> tuple[dict[str, Any], str, Any]:
    """Everything a guard is built from: the Kafka client's configuration, the topic, the tag policy."""
    return settings.kafka_config(), settings.topics.budget_blocks, settings.attribution_policy()


def fields_read(read: Callable[[Any], Any]) -> set[str]:
    """The names `read` takes from a server `Settings` (recorded through a stand-in)."""
    real, names = Settings(), set()

    class Recorder:
        def __getattr__(self, name: str) -> Any:
            names.add(name)
            return getattr(real, name)

    read(Recorder())
    return names


def server_fields_a_guard_reads() -> set[str]:
    return (
        fields_read(Settings.kafka_config)
        | fields_read(Settings.attribution_policy)
        | fields_read(lambda s: Settings.topics.fget(s))  # type: ignore[attr-defined]
    )


@pytest.fixture
def unstarted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards are built but not started: no consumer thread, no broker."""
    monkeypatch.setattr(guard_module.BudgetGuard, "start", lambda self: self)


def test_the_guard_settings_hold_every_server_setting_a_guard_reads() -> None:
    """A setting the server's `kafka_config()`, `attribution_policy()` or `topics` starts to read fails
    here until GuardSettings has it (and SAMPLES a value for it, for the tests below)."""
    read = server_fields_a_guard_reads()
    assert read <= set(Settings.model_fields), f"not plain fields, read them one by one: {read}"
    assert read == set(SAMPLES)
    assert read <= set(GuardSettings.model_fields)


def test_the_same_variable_names_and_sources() -> None:
    for key in ("env_prefix", "env_file", "case_sensitive", "env_nested_delimiter", "extra"):
        assert GuardSettings.model_config.get(key) == Settings.model_config.get(key), key
    for name in GuardSettings.model_fields:
        guard_field, server_field = GuardSettings.model_fields[name], Settings.model_fields[name]
        assert (guard_field.alias, guard_field.validation_alias) == (None, None), name
        assert (server_field.alias, server_field.validation_alias) == (None, None), name


def test_the_defaults_are_the_servers() -> None:
    assert what_the_guard_gets(GuardSettings()) == what_the_guard_gets(Settings())
    for name in GuardSettings.model_fields:
        assert getattr(GuardSettings(), name) == getattr(Settings(), name), name


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_each_variable_reaches_the_guard_as_it_reaches_the_server(
    monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    """One variable set: the guard sees what the server sees, and that differs from the defaults (so a
    variable the guard forgot would fail here)."""
    defaults = what_the_guard_gets(Settings())
    monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", SAMPLES[field])
    server = what_the_guard_gets(Settings())
    assert server != defaults
    assert what_the_guard_gets(GuardSettings()) == server


def test_every_variable_at_once_and_from_dot_env(monkeypatch: pytest.MonkeyPatch, no_settings: Path) -> None:
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    from_environment = what_the_guard_gets(GuardSettings())
    assert from_environment == what_the_guard_gets(Settings())
    assert from_environment[0]["sasl.password"] == "s3cret"
    assert from_environment[1] == "staging-spend.budget-blocks"
    assert from_environment[2].max_tags == 7 and from_environment[2].user_id_hmac_key == b"pseudonym-key"

    for field in SAMPLES:
        monkeypatch.delenv(f"SPENDLEDGER_{field.upper()}")
    (no_settings / ".env").write_text(
        "".join(f"SPENDLEDGER_{field.upper()}='{value}'\n" for field, value in SAMPLES.items())
    )
    assert what_the_guard_gets(GuardSettings()) == what_the_guard_gets(Settings()) == from_environment


def test_an_empty_hmac_key_means_none_as_on_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDLEDGER_USER_ID_HMAC_KEY", "")
    assert GuardSettings().attribution_policy() == Settings().attribution_policy()
    assert GuardSettings().attribution_policy().user_id_hmac_key is None


@pytest.mark.parametrize(
    ("field", "value"), [("max_tags", "0"), ("kafka_security", "not json"), ("kafka_security", "[1]")]
)
def test_a_value_the_server_refuses_the_guard_refuses(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    with pytest.raises(ValueError, match=field) as server:
        Settings()
    with pytest.raises(ValueError, match=field) as guard:
        GuardSettings()
    assert type(guard.value) is type(server.value)
    assert value not in str(guard.value)  # a rejected value is never quoted (it may be a key)


def test_from_settings_builds_the_guard_the_server_would(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    guard = BudgetGuard.from_settings(GuardSettings())
    config, topic, policy = what_the_guard_gets(Settings())
    assert guard.view.topic == topic and guard.policy == policy
    assert {k: guard.view._config[k] for k in config} == config


@pytest.mark.usefixtures("unstarted")
def test_budget_guard_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    guard = budget_guard(wait_s=0)
    config, topic, policy = what_the_guard_gets(Settings())
    assert guard.view.topic == topic and guard.policy == policy
    assert {k: guard.view._config[k] for k in config} == config


@pytest.mark.usefixtures("unstarted")
def test_budget_guard_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    guard = budget_guard("arg-broker:9092", topic_prefix="", wait_s=0)
    assert guard.view._config["bootstrap.servers"] == "arg-broker:9092"
    assert guard.view.topic == "spend.budget-blocks"  # an empty prefix given is a prefix given
    server = Settings(kafka_bootstrap="arg-broker:9092", topic_prefix="")
    assert {k: guard.view._config[k] for k in server.kafka_config()} == server.kafka_config()
    assert guard.policy == server.attribution_policy()  # the rest still from the environment


@pytest.mark.usefixtures("unstarted")
def test_the_litellm_plugins_guard_reads_the_guard_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDLEDGER_URL", "http://ledger")
    monkeypatch.setenv("SPENDLEDGER_API_KEY", "sl_test")
    for field, value in SAMPLES.items():
        monkeypatch.setenv(f"SPENDLEDGER_{field.upper()}", value)
    checker = plugin.from_environment().checker
    assert isinstance(checker, plugin.GuardCheck)
    config, topic, policy = what_the_guard_gets(Settings())
    assert checker.guard.view.topic == topic and checker.guard.policy == policy
    assert {k: checker.guard.view._config[k] for k in config} == config


async def test_the_litellm_guard_check_answers_with_the_servers_pseudonyms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `user:` budget is keyed by the server's pseudonym: the plugin's guard must hash with the same key."""
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from ledger.tags import normalize
    from schemas.budgets import BlockSignal

    monkeypatch.setenv("SPENDLEDGER_USER_ID_HMAC_KEY", SAMPLES["user_id_hmac_key"])
    server_policy = Settings().attribution_policy()
    (tag,) = normalize(users=["u-42"], policy=server_policy).tags
    assert tag != "user:u-42"
    now = datetime.now(UTC)
    guard = BudgetGuard.from_settings(GuardSettings())
    guard.view.put(
        tag,
        BlockSignal(
            tag=tag,
            blocked=True,
            spend_usd=Decimal("2"),
            max_budget_usd=Decimal("1"),
            window_start=now - timedelta(hours=1),
            window_end=now + timedelta(hours=1),
            updated_at=now,
        ),
    )
    guard.view.mark_current()
    answer = await plugin.GuardCheck(guard).check({"user": "u-42"})
    assert answer is not None and not answer["allowed"]
    assert [b["tag"] for b in answer["blocked_by"]] == [tag]
