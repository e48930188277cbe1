"""Property: whatever statement `POST /v1/sql` is sent, nothing outside the ledger's database is read
and nothing is written.

Statements are generated from fragments: the ledger's own tables and functions, and everything an
attacker reaches for (other databases, system tables, table functions, functions that read files,
settings or the server, writes smuggled behind comments, INTO OUTFILE, SETTINGS, FORMAT), joined by
whitespace, comments and quotes in comments. The app runs on the real engine (chDB) beside the
door of test_sql_door: another database and a file holding secrets, and an HTTP server counting hits.
For every statement:
- never a 5xx; a refusal is a typed 4xx;
- no secret in the answer, and the other database's name only if the statement named it;
- every table of both databases holds the rows it held, no database or file appears, no server is hit;
- a statement with any fragment that reaches outside the ledger is refused.
"""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from spendledger.services import build_query_engine
from tests.component.test_sql_door import ADMIN, Door, door, door_settings  # noqa: F401 (fixture)

EXAMPLES = 300

# (text, reaches outside the ledger)
PROJECTIONS = [
    ("count() AS n", False),
    ("team, sum(cost_usd) AS cost", False),
    ("toStartOfDay(occurred_at) AS day", False),
    ("'x' AS s", False),
    ("arrayMap(x -> x * 2, [1, 2]) AS a", False),
    ("uniqExactIf(user_id, team != '') AS u", False),
    ("*", False),
    ("file('{canary_file}') AS f", True),
    ("`file`('{canary_file}') AS f", True),
    ("FILE('{canary_file}') AS f", True),
    ("getSetting('readonly') AS r", True),
    ("hasColumnInTable('{other}', 'secrets', 'v') AS h", True),
    ("(SELECT v FROM {other}.secrets LIMIT 1) AS v", True),
    ("dictGet('d', 'a', toUInt64(1)) AS d", True),
    ("joinGet('j', 'v', 1) AS j", True),
    ("currentUser() AS u", True),
    ("version() AS v", True),
    ("system.one.dummy AS d", True),
    ("{other}.secrets.v AS v", True),
    ("arrayMap(p -> file(p), ['{canary_file}']) AS f", True),
]
SOURCES = [
    ("spend_records", False),
    ("spend_daily", False),
    ("budget_events", False),
    ("{db}.spend_records", False),
    ("(SELECT * FROM spend_records LIMIT 3)", False),
    ("{other}.secrets", True),
    ("`{other}`.`secrets`", True),
    ("{other}/**/.secrets", True),
    ("system.tables", True),
    ("system.databases", True),
    ("INFORMATION_SCHEMA.TABLES", True),
    ("api_keys", True),
    ("file('{canary_file}', 'LineAsString')", True),
    ("url('http://127.0.0.1:{port}/from', 'LineAsString')", True),
    ("merge(REGEXP('^{other}$'), '.*')", True),
    ("numbers(3)", True),
    ("remote('127.0.0.1', system.one)", True),
    ("cluster('default', system.one)", True),
    ("s3('http://127.0.0.1:{port}/s3', 'CSV')", True),
    ("view(SELECT * FROM {other}.secrets)", True),
    ("(SELECT v FROM {other}.secrets)", True),
]
FILTERS = [
    ("", False),
    (" WHERE 1", False),
    (" WHERE team IN ('a', 'b')", False),
    (" WHERE team IN (SELECT team FROM spend_daily)", False),
    (" WHERE 'x' IN {other}.secrets", True),
    (" WHERE 'x' IN ({other}.secrets)", True),
    (" WHERE team IN (SELECT v FROM {other}.secrets)", True),
    (" WHERE has([file('{canary_file}')], team)", True),
]
TAILS = [
    ("", False),
    (";", False),
    (" LIMIT 5", False),
    (" -- a comment", False),
    (" /* a ' comment */", False),
    (" -- '\n; INSERT INTO spend_records (event_id) VALUES ('pwned') -- '", True),
    (" -- '\n; INSERT INTO spend_records (event_id) VALUES ('pwned'); SELECT 2 -- '", True),
    (" -- '\n; DELETE FROM spend_records WHERE 1; SELECT 2 -- '", True),
    (" -- '\n; CREATE TABLE pwned (a UInt8) ENGINE = Memory; SELECT 2 -- '", True),
    (" /* ' */; DROP TABLE spend_records", True),
    ("\n#'\n; CREATE TABLE pwned (a UInt8) ENGINE = Memory", True),
    (" -- '\n; INSERT INTO FUNCTION file('{files}/p.csv', 'CSV', 'a UInt8') VALUES (1); SELECT 2 -- '", True),
    (" -- '\n; SELECT * FROM url('http://127.0.0.1:{port}/tail', 'LineAsString') -- '", True),
    (" UNION ALL SELECT v FROM {other}.secrets", True),
    (" INTO OUTFILE '{files}/out.tsv'", True),
    (" INTO OUTFILE '{files}/out.tsv' APPEND", True),
    (" FORMAT CSV", True),
    (" SETTINGS readonly = 0", True),
]
PREFIXES = [("", False), ("-- '\n", False), ("/* ; */ ", False), ("WITH 1 AS one ", False)]
STATEMENTS = [
    ("SHOW TABLES", False),
    ("DESCRIBE spend_records", False),
    ("INSERT INTO spend_records (event_id) VALUES ('p')", True),
    ("CREATE TABLE p (a UInt8) ENGINE = Memory", True),
    ("DROP TABLE spend_records", True),
    ("TRUNCATE TABLE spend_records", True),
    ("ALTER TABLE spend_records DELETE WHERE 1", True),
    ("DELETE FROM spend_records WHERE 1", True),
    ("INSERT INTO FUNCTION file('{files}/p.csv', 'CSV', 'a UInt8') VALUES (1)", True),
    ("INSERT INTO {other}.secrets VALUES ('x')", True),
    ("SET readonly = 0", True),
    ("USE {other}", True),
    ("DETACH TABLE spend_records", True),
    ("OPTIMIZE TABLE spend_records FINAL", True),
    ("RENAME TABLE spend_records TO x", True),
    ("KILL QUERY WHERE 1", True),
    ("SYSTEM DROP DNS CACHE", True),
    ("GRANT ALL ON *.* TO default", True),
    ("BACKUP TABLE spend_records TO File('{files}/b')", True),
    ("SHOW DATABASES", True),
    ("SHOW TABLES FROM {other}", True),
    ("SHOW TABLES FROM/**/system", True),
    ("SHOW PROCESSLIST", True),
    ("SHOW CREATE TABLE {other}.secrets", True),
    ("DESCRIBE {other}.secrets", True),
    ("EXISTS {other}.secrets", True),
    ("EXPLAIN SELECT * FROM {other}.secrets", True),
]
SEPARATORS = [" ", "\n", "/**/ ", " -- x\n", " --'\n", " /*'*/ "]


@st.composite
def statements(draw: Any) -> tuple[str, bool]:
    if draw(st.integers(0, 4)) == 0:
        parts = [draw(st.sampled_from(STATEMENTS)), draw(st.sampled_from(TAILS))]
    else:
        gap = draw(st.sampled_from(SEPARATORS))
        parts = [
            draw(st.sampled_from(PREFIXES)),
            (f"SELECT{gap}", False),
            draw(st.sampled_from(PROJECTIONS)),
            (f"{gap}FROM{gap}", False),
            draw(st.sampled_from(SOURCES)),
            draw(st.sampled_from(FILTERS)),
            draw(st.sampled_from(TAILS)),
        ]
    return "".join(text for text, _ in parts), any(reaches for _, reaches in parts)


@pytest.fixture(scope="module")
def http(door: Door, chdb_dsn: str) -> Any:  # noqa: F811 (the fixture imported above)
    # Wired as the API process wires it: SQL on threads and connections of its own.
    settings = door_settings(clickhouse_dsn=chdb_dsn, clickhouse_database=door.database)
    services = Services(
        settings=settings, publisher=InMemoryPublisher(), queries=build_query_engine(settings)
    )
    with TestClient(create_app(services)) as client:
        yield client


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(case=statements())
def test_nothing_outside_the_ledger_is_read_and_nothing_is_written(http: Any, door: Door, case: Any) -> None:  # noqa: F811
    template, reaches = case
    query = door.fill(template)
    before = door.state()
    response = http.post("/v1/sql", json={"query": query}, headers=ADMIN)
    assert response.status_code < 500, (query, response.text[:300])
    assert not any(secret in response.text for secret in door.secrets), (query, response.text[:300])
    assert door.other not in response.text or door.other in query, (query, response.text[:300])
    assert door.state() == before, query
    assert door.hits == [], query
    if reaches:
        assert response.status_code in (400, 422), (query, response.text[:300])
        assert response.json()["error"]["code"] in ("invalid_query", "query_limit_exceeded")
    else:
        assert response.status_code in (200, 400), (query, response.text[:300])
