"""ClickHouse connections and migrations, for a ClickHouse server or embedded chDB (same API)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import clickhouse_connect

from schemas.clickhouse import migrations
from spendledger.platform.errors import StorageUnavailable
from spendledger.platform.settings import ApiSettings, ClickHouseSettings

log = logging.getLogger(__name__)


# Bytes of bound values one query may hold: clickhouse-connect writes them into the query's text, and
# ClickHouse refuses a query over max_query_size (256 KiB by default).
QUERY_VALUES_BYTES = 200_000
_ESCAPED = "\\'\t\n`"  # what the client escapes with a backslash


def quoted_slices(values: Iterable[str], max_bytes: int = QUERY_VALUES_BYTES) -> list[tuple[str, ...]]:
    """The values in groups whose list, as the client writes it into a query, stays under `max_bytes`."""
    slices: list[tuple[str, ...]] = []
    group: list[str] = []
    size = 0
    for value in values:
        cost = len(value.encode()) + sum(value.count(c) for c in _ESCAPED) + 4  # quotes, comma, space
        if group and size + cost > max_bytes:
            slices.append(tuple(group))
            group, size = [], 0
        group.append(value)
        size += cost
    return [*slices, tuple(group)] if group else slices


def connect(settings: ClickHouseSettings, *, create_database: bool = True) -> Any:
    """A clickhouse-connect client bound to the ledger's database.

    `chdb://DIR` opens the embedded engine: only ONE process may open DIR. `relay://…` reaches the engine
    another process opened (the embedded system's sink; spendledger.platform.chdb_relay), already migrated.
    """
    dsn = settings.clickhouse_dsn.get_secret_value()
    if settings.is_relayed_clickhouse:
        from spendledger.platform.chdb_relay import RelayClient

        return RelayClient(dsn)
    try:
        if create_database:
            bootstrap = clickhouse_connect.get_client(dsn=dsn)
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{settings.clickhouse_database}`")
        return clickhouse_connect.get_client(dsn=dsn, database=settings.clickhouse_database)
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise StorageUnavailable(f"cannot open ClickHouse: {_describe(exc)}") from exc


def connect_analyst(settings: ApiSettings) -> Any:
    """A client for /v1/sql: in server mode as the analyst user (`analyst_statements`), embedded as the
    engine's one user (chDB has no users: the guard, readonly=1 and the limits are the whole fence)."""
    dsn = settings.clickhouse_dsn.get_secret_value()
    if settings.is_embedded_clickhouse:
        return connect(settings, create_database=False)
    password = settings.clickhouse_analyst_password
    if password is None:
        raise StorageUnavailable("no analyst user: set SPENDLEDGER_CLICKHOUSE_ANALYST_PASSWORD")
    try:
        return clickhouse_connect.get_client(
            dsn=dsn,
            username=settings.clickhouse_analyst_user,
            password=password.get_secret_value(),
            database=settings.clickhouse_database,
        )
    except Exception as exc:  # clickhouse-connect raises several unrelated types
        raise StorageUnavailable(
            f"cannot open ClickHouse as {settings.clickhouse_analyst_user} (run `spendledger migrate` with "
            f"the same SPENDLEDGER_CLICKHOUSE_ANALYST_PASSWORD): {_describe(exc)}"
        ) from exc


def analyst_statements(settings: ApiSettings, private_tables: frozenset[str]) -> list[str]:
    """The ClickHouse user /v1/sql runs as in server mode: SELECT on the ledger's database (but its
    private tables) and nothing else, in a settings profile with readonly=1 and the API's limits
    (readonly=1 also means the user may change no setting: the profile is where the limits live).
    Idempotent: run again, it sets the password, the limits and the grants to the current settings."""
    user, database = settings.clickhouse_analyst_user, settings.clickhouse_database
    password = settings.clickhouse_analyst_password
    if password is None:
        raise ValueError("the analyst user needs SPENDLEDGER_CLICKHOUSE_ANALYST_PASSWORD")
    profile = f"{user}_profile"
    # Names are identifiers (the settings' patterns), so they quote safely in backticks.
    limits = ", ".join(
        (
            "readonly = 1",
            f"max_execution_time = {settings.sql_max_seconds}",
            f"max_memory_usage = {settings.sql_max_memory_bytes}",
            f"max_result_rows = {settings.sql_max_rows}",
            f"max_result_bytes = {2 * settings.sql_max_result_bytes}",
            "result_overflow_mode = 'throw'",
        )
    )
    return [
        f"CREATE SETTINGS PROFILE IF NOT EXISTS `{profile}`",
        f"ALTER SETTINGS PROFILE `{profile}` SETTINGS {limits}",
        f"CREATE USER IF NOT EXISTS `{user}`",
        f"ALTER USER `{user}` IDENTIFIED WITH sha256_password BY {_quote(password.get_secret_value())} "
        f"DEFAULT DATABASE `{database}` SETTINGS PROFILE '{profile}'",
        f"REVOKE ALL ON *.* FROM `{user}`",
        f"GRANT SELECT ON `{database}`.* TO `{user}`",
        *(f"REVOKE SELECT ON `{database}`.`{t}` FROM `{user}`" for t in sorted(private_tables)),  # noqa: S608
    ]


def migrate_analyst(client: Any, settings: ApiSettings, private_tables: frozenset[str]) -> bool:
    """Create or update the analyst user in server mode; False where there is none to make (embedded,
    or no password set)."""
    if settings.is_embedded_clickhouse or settings.clickhouse_analyst_password is None:
        return False
    for statement in analyst_statements(settings, private_tables):
        try:
            client.command(statement)
        except Exception as exc:  # clickhouse-connect raises several unrelated types
            verb = " ".join(statement.split()[:3])  # never the statement itself: it may hold the password
            raise StorageUnavailable(f"cannot set up the analyst user ({verb} …): {_describe(exc)}") from exc
    log.info("analyst user ready", extra={"user": settings.clickhouse_analyst_user})
    return True


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


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
