"""The defaults that name a place on disk agree: `spendledger up` and the settings' default DSN open the
same ClickHouse data directory, so a user who switches between them finds their ledger."""

from pathlib import Path

from spendledger.cli import DEFAULT_DATA_DIR
from spendledger.platform.settings import Settings


def test_the_default_dsn_is_the_clickhouse_folder_of_the_default_data_dir(monkeypatch) -> None:
    monkeypatch.delenv("SPENDLEDGER_CLICKHOUSE_DSN", raising=False)
    dsn = Settings(_env_file=None).clickhouse_dsn.get_secret_value()  # type: ignore[call-arg]
    assert dsn.startswith("chdb://")
    assert Path(dsn.removeprefix("chdb://")) == Path(".") / DEFAULT_DATA_DIR / "clickhouse"
