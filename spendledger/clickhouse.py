"""ClickHouse connections and migrations, for a ClickHouse server or embedded chDB (same API)."""

from __future__ import annotations

import logging
import re
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
    """Apply every DDL file (idempotent: CREATE … IF NOT EXISTS). Returns the files applied.

    A rollup created by this run is back-filled from `spend_records` with its
    view's own SELECT, so it holds the rows that landed before it existed.
    Rows landing while this runs could be counted twice: migrate before the
    sinks start (the embedded system does).
    """
    applied = []
    for name, statements in migrations():
        for statement in statements:
            view = materialized_view(statement)
            created = view is not None and not int(client.command(f"EXISTS TABLE {view[0]}"))
            client.command(statement)
            if view is not None and created:
                _, target, select = view
                client.command(f"INSERT INTO {target} {select}")
                log.info("rollup back-filled", extra={"table": target})
        applied.append(name)
        log.info("migration applied", extra={"file": name})
    return applied


_VIEW = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+) AS\s+(SELECT\b.*)$", re.DOTALL | re.IGNORECASE
)


def materialized_view(statement: str) -> tuple[str, str, str] | None:
    """(view, target table, SELECT) of a `CREATE MATERIALIZED VIEW v TO target AS SELECT …` statement."""
    match = _VIEW.match(statement.strip())
    return (match.group(1), match.group(2), match.group(3)) if match else None


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
