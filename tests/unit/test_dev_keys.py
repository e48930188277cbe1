"""`up` prints the dev keys it generates, never a key the operator configured."""

from pathlib import Path

from spendledger.embedded import EmbeddedSystem


def test_a_configured_key_is_never_printed_and_only_generated_ones_are(tmp_path: Path) -> None:
    said: list[str] = []
    system = EmbeddedSystem(data_dir=tmp_path, say=said.append)
    env = {"SPENDLEDGER_PRODUCER_KEYS": "sl_prod_operators-own-secret,second"}
    system._keys(env)
    text = "\n".join(said)
    assert "operators-own-secret" not in text and "second" not in text
    assert "(configured: SPENDLEDGER_PRODUCER_KEYS)" in text
    assert system.analyst_key.startswith("sl_analyst_") and system.analyst_key in text
    assert env["SPENDLEDGER_PRODUCER_KEYS"] == "sl_prod_operators-own-secret,second"
    assert not system.dev_keys  # so `up` prints no export line with the operator's key either


def test_with_nothing_configured_every_key_is_generated_and_printed(tmp_path: Path) -> None:
    said: list[str] = []
    system = EmbeddedSystem(data_dir=tmp_path, say=said.append)
    system._keys({})
    assert system.dev_keys and all(k in "\n".join(said) for k in (system.producer_key, system.admin_key))
    assert (tmp_path / "dev-keys.json").stat().st_mode & 0o777 == 0o600
