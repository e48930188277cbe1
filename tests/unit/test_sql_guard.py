from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ingest.errors import InvalidQuery
from ingest.sql import check_read_only, other_database_in, to_json_value


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", "SELECT 1"),
        ("  select 1 ;  ", "select 1"),
        ("-- comment\nWITH x AS (SELECT 1) SELECT * FROM x", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("SELECT ';' AS s", "SELECT ';' AS s"),
        ("SHOW TABLES", "SHOW TABLES"),
    ],
)
def test_read_only_accepted(sql, expected):
    assert check_read_only(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "",
        ";",
        "INSERT INTO spend_records VALUES (1)",
        "DROP TABLE spend_records",
        "SELECT 1; DROP TABLE x",
        "ALTER TABLE t DELETE WHERE 1",
        "SELECT 1 FORMAT CSV",
    ],
)
def test_writes_and_multi_statements_refused(sql):
    with pytest.raises(InvalidQuery):
        check_read_only(sql)


def test_json_values_are_exact():
    assert to_json_value(Decimal("0.000000000123")) == "0.000000000123"
    assert to_json_value(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00+00:00"
    assert to_json_value({"k": [Decimal("1.5")]}) == {"k": ["1.5"]}


OTHERS = {"system", "information_schema", "INFORMATION_SCHEMA", "default", "billing"}


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT name FROM system.tables", "system"),
        ("SELECT * FROM `system`.`one`", "system"),
        ('SELECT * FROM "billing" . invoices', "billing"),
        ("SHOW TABLES FROM default", "default"),
        ("SHOW TABLES IN information_schema", "INFORMATION_SCHEMA"),  # names compare case-insensitively
        ("SELECT * FROM spend_records WHERE app_id IN (SELECT app FROM billing.apps)", "billing"),
        ("SELECT team, sum(cost_usd) FROM spend_records GROUP BY team", None),
        ("SELECT 'system.tables' AS s FROM spend_records", None),  # inside a literal
        ("SELECT count() FROM spend_records AS billing", None),  # an alias, not a database
        ("SELECT t.team FROM spend_records AS t", None),
        ("SELECT * FROM spend_daily_tags", None),
    ],
)
def test_queries_may_name_only_the_ledgers_own_database(sql, named):
    assert other_database_in(sql, OTHERS) == named
