from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ingest.errors import InvalidQuery
from ingest.sql import check_read_only, to_json_value


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
