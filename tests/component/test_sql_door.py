"""`POST /v1/sql` against the real engine (chDB): every attack of the issue-18 audit, refused with no effect.

The app runs with the in-memory publisher and a ClickHouse query engine on a fresh ledger database
(records landed by the sink's own store). Beside it sit what an attacker wants: another database
and a file, each holding a canary string, and a local HTTP server that counts the requests it gets.
Each attack must be answered with a typed 4xx, leak no canary, change no table, write no file and
reach no server.
"""

import http.server
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.errors import RateLimited
from ingest.publisher import InMemoryPublisher
from ingest.sql import ClickHouseQueryEngine, QueryGate, QueryLimits, QueryResult, to_json_value
from ingest.sql_guard import PRIVATE_TABLES, function_allowed, listed_functions
from processors.sink import ClickHouseStore, Landing
from spendledger.platform.clickhouse import connect, migrate
from spendledger.platform.settings import Settings
from tests.component.test_analytics import make_records
from tests.unit.test_sql_guard import EXAMPLES, SENT

ADMIN = {"Authorization": "Bearer admin-key"}
PRODUCER = {"Authorization": "Bearer prod-key"}


class Door:
    """The ledger database, the canaries around it, and how to tell that nothing moved."""

    def __init__(self, client: Any, tmp_path: Path) -> None:
        self.client = client
        self.database = client.database
        tag = uuid.uuid4().hex[:12]
        self.canary = f"CANARY{tag}"
        self.other = f"other_{self.canary}"
        self.files = tmp_path / "files"
        self.files.mkdir()
        self.canary_file = self.files / "canary.txt"
        self.secrets = (f"SECRET{tag}row", f"SECRET{tag}file", "PATH=")  # what only reading them shows
        self.canary_file.write_text(f"{self.secrets[1]}\n")
        client.command(f"CREATE DATABASE {self.other}")
        client.command(f"CREATE TABLE {self.other}.secrets (v String) ENGINE = MergeTree ORDER BY v")
        client.command(f"INSERT INTO {self.other}.secrets VALUES ('{self.secrets[0]}')")
        ClickHouseStore(client).land(Landing(records=make_records(40), next_offsets={("t", 0): 1}), "sink")
        self.hits: list[str] = []
        self.server = _listen(self.hits)
        self.port = self.server.server_address[1]

    def state(self) -> Any:
        """Every table (with its rows) of the two databases, every database, every file written."""
        tables = self.client.query(
            "SELECT database, name FROM system.tables WHERE database IN (%(a)s, %(b)s) ORDER BY 1, 2",
            parameters={"a": self.database, "b": self.other},
        ).result_rows
        counts = [
            (db, name, self.client.query(f"SELECT count() FROM `{db}`.`{name}`").result_rows[0][0])
            for db, name in tables
            if not name.endswith("_mv")
        ]
        databases = self.client.query("SELECT name FROM system.databases ORDER BY name").result_rows
        return counts, databases, sorted(p.name for p in self.files.iterdir())

    def fill(self, query: str) -> str:
        return query.format(
            other=self.other,
            files=self.files,
            canary_file=self.canary_file,
            port=self.port,
            db=self.database,
            canary=self.canary,
        )

    def close(self) -> None:
        self.server.shutdown()
        self.client.command(f"DROP DATABASE IF EXISTS {self.other}")


def _listen(hits: list[str]) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"served\n")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def door_settings(**extra: Any) -> Settings:
    return Settings.model_validate(
        {"producer_keys": "prod-key", "admin_keys": "admin-key", "sql_max_seconds": 5, **extra}
    )


@pytest.fixture(scope="module")
def door(chdb_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """One for the module: every test leaves it as it found it (the attacks' tests check exactly that)."""
    settings = Settings(clickhouse_dsn=chdb_dsn, clickhouse_database=f"door_{uuid.uuid4().hex[:8]}")
    client = connect(settings)
    migrate(client)
    door = Door(client, tmp_path_factory.mktemp("door"))
    yield door
    door.close()
    client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")


@pytest.fixture
async def api(door: Door) -> Any:
    services = Services(
        settings=door_settings(), publisher=InMemoryPublisher(), queries=ClickHouseQueryEngine(door.client)
    )
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as c:
        yield c


# The audit's findings, each as it was sent (with this test's names for the targets).
# The write in the middle: the readonly=1 the old code appended reached the last statement only.
SMUGGLED = "SELECT 1 AS x -- '\n; {}; SELECT 2 AS y -- '"
ATTACKS = {
    # A `'` inside a `--` comment hid the `;` from the literal-stripping regex; chDB ran every statement
    # and the appended readonly=1 covered the last one only.
    "comment-hidden second statement": "SELECT getSetting('readonly') AS ro -- '\n; SELECT 7 -- '",
    "smuggled CREATE TABLE": SMUGGLED.format("CREATE TABLE pwned (a UInt8) ENGINE = Memory"),
    "smuggled INSERT": SMUGGLED.format("INSERT INTO spend_records (event_id) VALUES ('pwned')"),
    "smuggled DELETE": SMUGGLED.format("DELETE FROM spend_records WHERE 1"),
    "smuggled INSERT INTO FUNCTION file": SMUGGLED.format(
        "INSERT INTO FUNCTION file('{files}/pwned.csv', 'CSV', 'a UInt8') VALUES (1)"
    ),
    "smuggled url()": SMUGGLED.format(
        "SELECT * FROM url('http://127.0.0.1:{port}/smuggled', 'LineAsString')"
    ),
    "smuggled write into the other database": SMUGGLED.format("INSERT INTO {other}.secrets VALUES ('x')"),
    # Read with readonly on.
    "file() reads a file": "SELECT file('{canary_file}') AS f",
    "file() reads the environment": "SELECT file('/proc/self/environ') AS env",
    "INTO OUTFILE": "SELECT 1 INTO OUTFILE '{files}/out.tsv'",
    "INTO OUTFILE APPEND": "SELECT 1 INTO OUTFILE '{files}/out.tsv' APPEND",
    "INTO OUTFILE TRUNCATE": "SELECT 1 INTO OUTFILE '{files}/out.tsv' TRUNCATE",
    "url() in a SELECT": "SELECT * FROM url('http://127.0.0.1:{port}/direct', 'LineAsString')",
    # "The ledger database only" filter.
    "SHOW TABLES FROM/**/other": "SHOW TABLES FROM/**/{other}",
    "SHOW TABLES FROM/**/system": "SHOW TABLES FROM/**/system",
    "merge() over the other database": "SELECT * FROM merge(REGEXP('^{other}$'), '^secrets$')",
    "merge() over system.settings": "SELECT name FROM merge(REGEXP('^system$'), '^settings$') LIMIT 1",
    "SHOW PROCESSLIST": "SHOW PROCESSLIST",
    "hasColumnInTable": "SELECT hasColumnInTable('{other}', 'secrets', 'v') AS h",
    "IN the other database's table": "SELECT count() AS n FROM spend_records WHERE 'x' IN {other}.secrets",
    "a three-part name": "SELECT system.one.dummy AS d",
    "the list of databases": "SHOW DATABASES",
    "system.databases": "SELECT name FROM system.databases",
    "getSetting": "SELECT getSetting('max_memory_usage') AS m",
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
async def test_each_attack_is_refused_and_changes_nothing(api: Any, door: Door, attack: str) -> None:
    query = door.fill(attack)
    before = door.state()
    response = await api.post("/v1/sql", json={"query": query}, headers=ADMIN)
    time.sleep(0.05)  # a server hit or a file write would land by now
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "invalid_query" and len(error["message"]) >= 20, error
    assert not any(secret in response.text for secret in door.secrets)
    assert door.other not in response.text or door.other in query  # named by the query, not listed
    assert door.state() == before
    assert door.hits == []


@pytest.mark.parametrize(
    "query",
    [
        "SELECT repeat('x', 1000000) AS s FROM numbers(500)",  # the audit's 500 MB body
        # The same without a table function: a constant, which ClickHouse's own byte limit counts once
        # per block; the rows' JSON is counted as they stream in.
        "SELECT repeat('x', 1000000) AS s, n FROM (SELECT arrayJoin(range(500)) AS n)",
        "SELECT n, repeat('x', 1000) AS s FROM (SELECT arrayJoin(range(100000)) AS n)",
    ],
)
async def test_a_huge_result_is_refused_by_size(api: Any, query: str) -> None:
    response = await api.post("/v1/sql", json={"query": query}, headers=ADMIN)
    assert response.status_code in (400, 422), response.text[:300]
    assert len(response.content) < 1000
    assert response.json()["error"]["code"] in ("invalid_query", "query_limit_exceeded")


async def test_the_byte_bound_is_the_json_body(door: Door) -> None:
    limits = {"sql_max_result_bytes": 10_000}
    services = Services(
        settings=door_settings(**limits),
        publisher=InMemoryPublisher(),
        queries=ClickHouseQueryEngine(door.client),
    )
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as api:
        fits = await api.post("/v1/sql", json={"query": "SELECT repeat('x', 9000) AS s"}, headers=ADMIN)
        over = await api.post("/v1/sql", json={"query": "SELECT repeat('x', 10000) AS s"}, headers=ADMIN)
    assert fits.status_code == 200 and len(fits.json()["rows"][0][0]) == 9000
    assert over.status_code == 422 and over.json()["error"]["details"] == {"limit_bytes": 10_000}


async def test_the_ledgers_own_tables_still_answer(api: Any, door: Door) -> None:
    response = await api.post(
        "/v1/sql",
        json={"query": "SELECT team, count() AS n FROM spend_records GROUP BY team ORDER BY team"},
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    expected = door.client.query("SELECT team, count() FROM spend_records GROUP BY team ORDER BY team")
    assert response.json() == {"columns": ["team", "n"], "rows": [list(r) for r in expected.result_rows]}


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs two cores to run a query beside the probes")
async def test_a_slow_query_holds_up_neither_readyz_nor_events(door: Door, chdb_dsn: str) -> None:
    from spendledger.services import build_query_engine

    settings = door_settings(clickhouse_dsn=chdb_dsn, clickhouse_database=door.database, sql_max_seconds=3)
    services = Services(
        settings=settings, publisher=InMemoryPublisher(), queries=build_query_engine(settings)
    )
    app = create_app(services)
    slow = (
        "SELECT count() AS n FROM (SELECT arrayJoin(range(100000)) AS a) AS x "
        "CROSS JOIN (SELECT arrayJoin(range(100000)) AS b) AS y WHERE sipHash64(a, b) % 7 = 1"
    )
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as api:
        import asyncio

        running = asyncio.create_task(api.post("/v1/sql", json={"query": slow}, headers=ADMIN))
        await asyncio.sleep(0.5)
        assert not running.done()
        for method, path, body, headers in (
            ("GET", "/readyz", None, None),
            ("POST", "/v1/events", {"kind": "request", "request_id": "r-slow", "model": "gpt-4o"}, PRODUCER),
        ):
            started = time.perf_counter()
            response = await api.request(method, path, json=body, headers=headers)
            assert response.status_code < 500 and time.perf_counter() - started < 0.5, (path, response.text)
        response = await running
        assert response.status_code == 422 and response.json()["error"]["code"] == "query_limit_exceeded"


@pytest.mark.parametrize(("where", "query"), EXAMPLES + [("suites", q) for q in SENT], ids=lambda v: v[:40])
def test_example_queries_answer_as_written(door: Door, where: str, query: str) -> None:
    # The statement that runs is rendered from the tree: it must answer what the caller's text does.
    engine = ClickHouseQueryEngine(door.client)
    result = engine.query(query, QueryLimits(10_000, 30, 2**30))
    raw = door.client.query(query)
    expected = [[to_json_value(v) for v in row] for row in raw.result_rows]
    assert result.columns == list(raw.column_names)
    if "ORDER BY" in query:
        assert result.rows == expected
    else:  # no order asked for: the same rows, in whichever order
        assert sorted(map(repr, result.rows)) == sorted(map(repr, expected))


async def test_show_tables_and_describe_are_the_ledgers(api: Any, door: Door) -> None:
    tables = await api.post("/v1/sql", json={"query": "SHOW TABLES"}, headers=ADMIN)
    names = {row[0] for row in tables.json()["rows"]}
    assert {"spend_records", "spend_daily", "budget_events"} <= names
    assert not names & PRIVATE_TABLES and "secrets" not in names
    described = await api.post("/v1/sql", json={"query": "DESCRIBE spend_records"}, headers=ADMIN)
    assert described.status_code == 200
    assert ["cost_usd", "Nullable(Decimal(38, 12))"] == described.json()["rows"][25][:2]


def test_the_function_list_against_the_engines_catalogue(door: Door) -> None:
    catalogue = {
        name: (bool(aggregate), category, alias_to)
        for name, aggregate, category, alias_to in door.client.query(
            "SELECT name, is_aggregate, categories, alias_to FROM system.functions WHERE origin = 'System'"
        ).result_rows
    }
    scalar, aggregate = listed_functions()
    listed = scalar | aggregate
    known = {name.lower() for name in catalogue}
    syntax = {
        "lambda",
        "exists",
        "grouping",
        "countdistinct",
        "isnotdistinctfrom",
        "caseWithExpression".lower(),
    }
    assert listed - known <= syntax, "names the engine does not know"
    assert {n.lower() for n, (agg, _, _) in catalogue.items() if agg} >= aggregate
    denied = {"Introspection", "AI", "Dictionary", "Embedded Dictionary", "Encryption", "Machine Learning"}
    for name, (_, category, alias_to) in catalogue.items():
        if category in denied or catalogue.get(alias_to, (False, "", ""))[1] in denied:
            assert not function_allowed(name), name
    reaching = """file url s3 remote remoteSecure cluster executable input merge dictGet dictGetString dictHas
        joinGet joinGetOrNull getSetting getSettingOrDefault getServerSetting getMergeTreeSetting hasColumnInTable
        currentUser user hostName FQDN version uptime getMacro getServerPort tcpPort serverUUID shardNum buildId
        filesystemAvailable filesystemCapacity sleep sleepEachRow generateSerialID showCertificate globalVariable
        currentQueryID queryID initialQueryID getClientHTTPHeader currentRoles currentProfiles getOSKernelVersion
        addressToSymbol demangle logTrace aiGenerate zookeeperSessionUptime""".split()
    assert [name for name in reaching if function_allowed(name)] == []
    # No name outside the list gets in under another's lower case, or as an aggregate with a suffix.
    assert sorted(n for n in catalogue if function_allowed(n) and n.lower() not in listed) == []


class Blocking:
    """An engine whose queries wait for `release`, recording the threads they ran on."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[str] = []

    def query(self, sql: str, limits: QueryLimits) -> QueryResult:
        self.threads.append(threading.current_thread().name)
        self.release.wait(10)
        return QueryResult(columns=["n"], rows=[[1]])

    def ping(self) -> bool:
        return True


async def test_the_gate_runs_a_few_queries_at_once_on_threads_of_its_own() -> None:
    import asyncio

    engine = Blocking()
    gate = QueryGate(engine, slots=1, wait_s=0.2)
    limits = QueryLimits(10, 1, 2**20)
    first = asyncio.create_task(gate.run("SELECT 1", limits))
    await asyncio.sleep(0.05)
    with pytest.raises(RateLimited) as refused:
        await gate.run("SELECT 2", limits)
    assert refused.value.retry_after_s == 1 and "SQL_MAX_CONCURRENCY" in refused.value.message
    first.cancel()  # the caller goes away; its query still holds the slot until its thread is done
    with pytest.raises(RateLimited):
        await gate.run("SELECT 3", limits)
    engine.release.set()
    await asyncio.sleep(0.05)
    assert (await gate.run("SELECT 4", limits)).rows == [[1]]
    assert engine.threads and all(name.startswith("sql") for name in engine.threads)
    gate.close()  # the app's shutdown; served again (tests do), the gate starts a new pool
    assert (await gate.run("SELECT 5", limits)).rows == [[1]]
    gate.close()
