"""ClickHouse connections and migrations, for a ClickHouse server or embedded chDB (same API)."""

from __future__ import annotations

import logging
from typing import Any

import clickhouse_connect

from schemas.clickhouse import migrations
from spendledger.errors import StorageUnavailable
from spendledger.settings import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings, *, create_database: bool = True) -> Any:
    """A clickhouse-connect client bound to the ledger's database.

    `chdb://DIR` opens the embedded engine: only ONE process may open DIR.
    """
    dsn = settings.clickhouse_dsn.get_secret_value()
    try:
        if create_database:
            bootstrap = clickhouse_connect.get_client(dsn=dsn)
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{settings.clickhouse_database}`")
        return clickhouse_connect.get_client(dsn=dsn, database=settings.clickhouse_database)
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise StorageUnavailable(f"cannot open ClickHouse: {_describe(exc)}") from exc


def migrate(client: Any) -> list[str]:
    """Apply every DDL file (idempotent: CREATE … IF NOT EXISTS). Returns the files applied."""
    applied = []
    for name, statements in migrations():
        for statement in statements:
            client.command(statement)
        applied.append(name)
        log.info("migration applied", extra={"file": name})
    return applied


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
