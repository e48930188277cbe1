"""Shared fixtures: the real ClickHouse engine (chDB) in this test process.

chDB allows one data directory per process, so every test that needs
ClickHouse in-process gets its own *database* in one session-wide directory.
"""

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spendledger.platform.clickhouse import connect, migrate
from spendledger.platform.settings import Settings

_databases = itertools.count()


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def clickhouse(chdb_dsn: str) -> Iterator[Callable[..., Any]]:
    """`clickhouse(migrated=True)`: a client on a fresh database, migrated unless told otherwise."""

    def open_database(*, migrated: bool = True) -> Any:
        settings = Settings(clickhouse_dsn=chdb_dsn, clickhouse_database=f"t{next(_databases)}")
        client = connect(settings)
        if migrated:
            migrate(client)
        return client

    yield open_database


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SPENDLEDGER_* variable and no `.env` in the working directory: each test sets its own."""
    for name in list(os.environ):
        if name.upper().startswith("SPENDLEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
