"""A settings object or a tag policy printed (a debugger, a log line, an error) shows no secret."""

from spendledger.guard import GuardSettings
from spendledger.platform.settings import Settings

SECRETS = {
    "SPENDLEDGER_KAFKA_SECURITY": '{"sasl.password": "kafka-pass-123"}',
    "SPENDLEDGER_USER_ID_HMAC_KEY": "hmac-key-456",
}


def test_no_secret_in_the_reprs_of_settings_or_the_tag_policy(monkeypatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for settings in (Settings(_env_file=None), GuardSettings(_env_file=None)):  # type: ignore[call-arg]
        assert settings.kafka_config()["sasl.password"] == "kafka-pass-123"  # still there to use
        shown = repr(settings) + str(settings) + repr(settings.attribution_policy())
        assert "kafka-pass-123" not in shown and "hmac-key-456" not in shown, shown
