"""Every SQL query in docs/analytics.md runs against chDB, and the checkable ones agree with spend_records."""

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from processors.sink import ClickHouseStore, Landing
from tests.component.test_analytics import make_records

DOC = Path(__file__).parents[2] / "docs" / "analytics.md"
QUERIES = re.findall(r"^```sql\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
NOVEMBER = "occurred_at >= '2026-11-01' AND occurred_at < '2026-12-01'"


@pytest.fixture(scope="module")
def ledger_db(chdb_dsn: str) -> Any:
    from spendledger.platform.clickhouse import connect, migrate
    from spendledger.platform.settings import Settings

    client = connect(Settings(clickhouse_dsn=chdb_dsn, clickhouse_database="analytics_docs"))
    migrate(client)
    client.command("TRUNCATE TABLE IF EXISTS spend_records")
    ClickHouseStore(client).land(Landing(records=make_records(), next_offsets={("a", 0): 1}), "sink")
    return client


def test_the_doc_has_its_queries():
    assert len(QUERIES) == 9


@pytest.mark.parametrize("query", QUERIES, ids=[f"query{n + 1}" for n in range(len(QUERIES))])
def test_each_query_runs_and_returns_rows(ledger_db, query):
    result = ledger_db.query(query)
    assert result.result_rows, f"no rows from:\n{query}"


def test_allocation_by_team_adds_up_to_the_records(ledger_db):
    rows = ledger_db.query(QUERIES[0]).result_rows
    ((records_cost, records_calls),) = ledger_db.query(
        f"SELECT sum(ifNull(cost_usd, 0)), count() FROM spend_records WHERE {NOVEMBER}"
    ).result_rows
    assert sum((Decimal(r[2]) for r in rows), Decimal(0)) == records_cost
    assert sum(r[1] for r in rows) == records_calls
    assert "(untagged)" in {r[0] for r in rows}


def test_the_reconciliation_query_says_equal(ledger_db):
    ((rollup, records, equal),) = ledger_db.query(QUERIES[-1]).result_rows
    assert rollup == records and equal == 1


def test_coverage_trend_matches_the_records(ledger_db):
    rows = ledger_db.query(QUERIES[5]).result_rows
    untagged_team = sum(r[3] for r in rows if r[1] == "team")
    ((expected,),) = ledger_db.query(
        f"SELECT count() FROM spend_records WHERE {NOVEMBER} AND team = ''"
    ).result_rows
    assert untagged_team == expected
