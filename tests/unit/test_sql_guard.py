"""The SQL door's guard as text in, text out: what is accepted, how it is rendered, what is refused and why."""

import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from ingest.errors import InvalidQuery
from ingest.sql import QueryLimits, to_json_value
from ingest.sql_guard import PRIVATE_TABLES, Statement, check_explained, check_query, function_allowed
from spendledger.platform.clickhouse import analyst_statements
from spendledger.platform.settings import Settings

DB = "spend"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("sql", "rendered"),
    [
        ("SELECT 1", "SELECT 1"),
        ("  select 1 ;  ", "SELECT 1"),
        ("-- comment\nWITH x AS (SELECT 1) SELECT * FROM x", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("SELECT ';' AS s", "SELECT ';' AS s"),
        ("SELECT 'it''s', 'a\\\\' /* a ' comment */", "SELECT 'it''s', 'a\\\\'"),
        # Functions keep their ClickHouse names and arguments: what runs is what was asked.
        ("SELECT toStartOfHour(occurred_at) h, if(a, b, c) FROM t", "SELECT toStartOfHour(occurred_at) AS h, if(a, b, c) FROM t"),
        ("SELECT countIf(x > 1), quantile(0.9)(latency_ms), uniqExact(user_id) FROM spend_records",
         "SELECT countIf(x > 1), quantile(0.9)(latency_ms), uniqExact(user_id) FROM spend_records"),
        ("SELECT arrayMap(x -> x * 2, [1, 2]), tags[1], metadata['k'], (1, 2).1", None),
        ("SELECT tag, count() FROM spend_records ARRAY JOIN tags AS tag GROUP BY tag", None),
        ("SELECT a FROM (SELECT 1 AS a UNION ALL SELECT 2) ORDER BY a WITH FILL", None),
        ("SELECT * FROM spend_records AS r LEFT JOIN spend_daily AS d USING (app_id)", None),
        ("SELECT * FROM tag_budgets FINAL LIMIT 1 BY tag", None),
        ("SELECT rank() OVER (PARTITION BY team ORDER BY cost_usd) FROM spend_records", None),
        ("SELECT * FROM spend.spend_records", None),  # qualified with the ledger's own database
        ("SELECT x FROM spend_records WHERE app_id IN (SELECT app_id FROM spend_daily)", None),
        ("SELECT x IN spend_daily FROM spend_records", None),
        ("(SELECT 1)", None),
    ],
)  # fmt: skip
def test_accepted_and_rendered(sql, rendered):
    statement = check_query(sql, DB)
    assert statement.kind == "select"
    assert statement.sql == (rendered or sql)


@pytest.mark.parametrize(
    ("sql", "kind", "rendered"),
    [
        ("SHOW TABLES", "tables", "SHOW TABLES FROM `spend`"),
        ("show tables;", "tables", "SHOW TABLES FROM `spend`"),
        ("DESCRIBE spend_records", "describe", "DESCRIBE TABLE `spend`.`spend_records`"),
        ("DESC TABLE `spend_daily`", "describe", "DESCRIBE TABLE `spend`.`spend_daily`"),
        ("describe spend.budget_events", "describe", "DESCRIBE TABLE `spend`.`budget_events`"),
    ],
)
def test_the_two_fixed_forms_are_rendered_here(sql, kind, rendered):
    assert check_query(sql, DB) == Statement(rendered, kind)


@pytest.mark.parametrize(
    ("sql", "words", "refused"),
    [
        ("", "empty", None),
        (";", "empty", None),
        ("-- only a comment", "empty", None),
        ("SELECT 1; DROP TABLE x", "only one statement", None),
        # The audit: a quote in a comment hid the `;` from the regex.
        ("SELECT getSetting('readonly') AS ro -- '\n; SELECT 7 -- '", "only one statement", None),
        ("SELECT 1 /* ' */; SELECT 2", "only one statement", None),
        ("INSERT INTO spend_records VALUES (1)", "only read-only queries", "statement"),
        ("DROP TABLE spend_records", "only read-only queries", "statement"),
        ("ALTER TABLE t DELETE WHERE 1", "only read-only queries", "statement"),
        ("EXPLAIN SELECT 1", "only read-only queries", "statement"),
        ("EXISTS spend_records", "only read-only queries", "statement"),
        ("SET readonly = 0", "only read-only queries", "statement"),
        ("SHOW TABLES FROM/**/system", "SHOW TABLES", "statement"),
        ("SHOW PROCESSLIST", "SHOW TABLES", "statement"),
        ("SHOW DATABASES", "SHOW TABLES", "statement"),
        ("DESCRIBE system.tables", "SHOW TABLES", "statement"),
        ("DESCRIBE (SELECT 1)", "SHOW TABLES", "statement"),
        ("SELECT 1 FORMAT CSV", "FORMAT", "FORMAT"),
        ("SELECT 1 SETTINGS readonly = 0", "SETTINGS", "SETTINGS"),
        (
            "WITH x AS (SELECT 1) SELECT * FROM x UNION ALL SELECT 2 SETTINGS max_threads = 1",
            "SETTINGS",
            "SETTINGS",
        ),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE", "into outfile"),
        ("SELECT 1 INTO OUTFILE '/tmp/x' APPEND", "INTO OUTFILE", "into outfile"),
        ("SELECT file('/etc/hostname')", "file()", "function"),
        ("SELECT `file`('/etc/hostname')", "file()", "function"),
        ("SELECT FILE('/etc/hostname')", "FILE()", "function"),
        ("SELECT getSetting('readonly')", "getSetting()", "function"),
        ("SELECT hasColumnInTable('system', 'one', 'dummy')", "hasColumnInTable()", "function"),
        ("SELECT dictGet('d', 'a', 1)", "dictGet()", "function"),
        ("SELECT joinGet('j', 'v', 1)", "joinGet()", "function"),
        ("SELECT currentUser(), hostName()", "currentUser()", "function"),
        ("SELECT sleep(3)", "sleep()", "function"),
        ("SELECT arrayMap(x -> file(x), ['/etc/hostname'])", "file()", "function"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "readonly", "table function"),
        ("SELECT * FROM url('http://127.0.0.1/', 'LineAsString')", "url()", "table function"),
        ("SELECT * FROM merge(REGEXP('^system$'), '^settings$')", "merge()", "table function"),
        ("SELECT * FROM numbers(500)", "arrayJoin(range(n))", "table function"),
        ("SELECT * FROM remote('127.0.0.1', system.one)", "remote()", "table function"),
        ("SELECT * FROM view(SELECT 1)", "view()", "table function"),
        ("SELECT name FROM system.tables", "the database 'system'", "database"),
        ("SELECT * FROM `system`.`one`", "the database 'system'", "database"),
        ('SELECT * FROM "billing" . invoices', "the database 'billing'", "database"),
        ("SELECT * FROM SPEND.spend_records", "the database 'SPEND'", "database"),  # names are case-sensitive
        (
            "SELECT * FROM spend_records WHERE app_id IN (SELECT app FROM billing.apps)",
            "'billing'",
            "database",
        ),
        ("SELECT 'x' IN system.tables", "'system'", "database"),
        ("SELECT 'x' IN (other.secrets)", "'other'", "database"),
        ("SELECT notIn('x', other.secrets)", "'other'", "database"),
        ("SELECT globalIn('x', (other.secrets))", "'other'", "database"),
        ("SELECT system.one.dummy", "'system'", "database"),
        ("SELECT * FROM api_keys", "api_keys", "table"),
        ("SELECT count() FROM spend.api_keys", "api_keys", "table"),
        ("SELECT {p:String}", "query parameters", None),
        ("SELECT ?", "query parameters", None),
        ("SELECT $$x$$", "heredoc", None),
        ("SELECT * APPLY(file) FROM spend_records", "not supported", "construct"),
        ("SELECT x = ANY(SELECT 1)", "not supported", "construct"),
        ('SELECT 1 AS "a""b"', "quotes", None),
        ("SELECT 1 +", "cannot be read", None),
        ("SELECT 'unterminated", "cannot be read", None),
        ("SELECT " + "(" * 3000 + "1" + ")" * 3000, "nested too deeply", None),
    ],
)
def test_refused_with_a_clear_reason(sql, words, refused):
    with pytest.raises(InvalidQuery) as caught:
        check_query(sql, DB)
    assert words in caught.value.message
    assert refused is None or caught.value.details["refused"] == refused


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("sum", True),
        ("sumIf", True),
        ("countIf", True),
        ("uniqExactIf", True),
        ("uniqMergeState", True),
        ("avgOrNullIf", True),
        ("SUM", True),  # ClickHouse resolves it without case
        ("toStartOfHour", True),
        ("formatRow", True),
        ("lambda", True),
        ("file", False),
        ("fileIf", False),
        ("getSetting", False),
        ("getSettingIf", False),
        ("hasColumnInTable", False),
        ("url", False),
        ("s3", False),
        ("remote", False),
        ("dictGetString", False),
        ("aiGenerate", False),
        ("currentUser", False),
        ("sleepEachRow", False),
        ("Merge", False),
    ],
)
def test_the_function_list(name, allowed):
    assert function_allowed(name) is allowed


# ClickHouse's reading of rendered statements (EXPLAIN AST), as its server prints it.
EXPLAINED_OK = """SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 3)
   ExpressionList (children 2)
    Function countIf (alias n) (children 1)
     ExpressionList (children 1)
      Function in (children 1)
       ExpressionList (children 2)
        Identifier team
        Identifier spend.spend_daily
    Identifier r.team
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier spend_records (alias r)
   Function greater (children 1)
    ExpressionList (children 2)
     Identifier latency_ms
     Literal UInt64_1
 Identifier Native"""


def test_clickhouses_own_reading_is_checked_too():
    check_explained(EXPLAINED_OK.splitlines(), DB)
    for old, new, words in (
        ("Function countIf", "Function file", "file()"),
        ("TableIdentifier spend_records", "TableIdentifier system.tables", "'system'"),
        ("Identifier spend.spend_daily", "Identifier other.secrets", "'other'"),  # `x IN db.t`
        ("Identifier r.team", "Identifier system.one.dummy", "'system'"),
        ("TableIdentifier spend_records", "TableIdentifier api_keys", "api_keys"),
        ("      TableIdentifier spend_records (alias r)", "      Function numbers", "numbers()"),
        ("     Literal UInt64_1", "     ColumnsApplyTransformer", "ColumnsApplyTransformer"),
        (" Identifier Native", " Literal '/tmp/out'\n Identifier Native", "more than one SELECT"),
    ):
        lines = EXPLAINED_OK.replace(old, new).splitlines()
        with pytest.raises(InvalidQuery, match=re.escape(words)):
            check_explained(lines, DB)
    # The first argument of IN is a value, not a table.
    check_explained(EXPLAINED_OK.replace("Identifier team", "Identifier r.team").splitlines(), DB)


def _examples() -> list[tuple[str, str]]:
    """Every example query in the README, the docs and the dashboard."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "ingest/ui/index.html"]:
        text = path.read_text(encoding="utf-8")
        queries = re.findall(r"^```sql\n(.*?)^```$", text, flags=re.S | re.M)
        queries += re.findall(r'spendledger sql "([^"]+)"', text)
        queries += re.findall(r'/v1/sql", \{query: "([^"]+)"\}', text)
        queries += re.findall(r'const [A-Z_]+_SQL = "([^"]+)";', text)  # the dashboard's queries
        queries += re.findall(r'/v1/sql \{"query": "([^"]+)"\}', text)
        found += [(path.name, q) for q in queries if "…" not in q]  # "SELECT …" is a placeholder
    return found


EXAMPLES = _examples()


def test_the_examples_are_found():
    names = {name for name, _ in EXAMPLES}
    assert {"README.md", "analytics.md", "sdk.md", "index.html"} <= names and len(EXAMPLES) >= 12


@pytest.mark.parametrize(("where", "query"), EXAMPLES, ids=[f"{w}:{q[:40]}" for w, q in EXAMPLES])
def test_every_example_query_passes_the_guard(where, query):
    assert check_query(query, DB).kind == "select"


# What the integration tests, the benchmarks and `spendledger sql` users send (with sample values).
SENT = [
    "SELECT count(), sum(ifNull(cost_usd, 0)), countIf(cost_usd IS NULL) FROM spend_records WHERE app_id = 'a'",
    "SELECT tag, count(), sum(ifNull(cost_usd, 0)) FROM spend_records ARRAY JOIN tags AS tag "
    "WHERE app_id = 'a' AND startsWith(tag, 'team:r') GROUP BY tag",
    "SELECT count() >= 0 FROM spend_daily",
    "SELECT toString(sum(cost_usd)) FROM spend_records WHERE has(tags, 'team:x') "
    "AND occurred_at >= parseDateTime64BestEffort('2026-11-01T00:00:00Z', 3) "
    "AND occurred_at < parseDateTime64BestEffort('2026-12-01T00:00:00Z', 3)",
    "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM spend_records WHERE startsWith(event_id, 'r-')",
    "SELECT count() FROM (SELECT 1 FROM budget_events WHERE event_type IN ('alert', 'soft_alert', 'blocked') "
    "ORDER BY at DESC LIMIT 10)",
    "SELECT count(), toString(sum(cost_usd)) FROM spend_records WHERE request_id LIKE 'r-%'",
    "SELECT count() FROM spend_records WHERE app_id = 'r' AND positionCaseInsensitive(formatRow('TSV', *), 'secret') > 0",
    "SELECT event_id, groupArray(toString(occurred_at)), groupArray(toString(landed_at)) FROM spend_records "
    "WHERE startsWith(request_id, 'r-') GROUP BY event_id HAVING count() > 1 LIMIT 3",
    "SELECT source_topic, reason FROM spend_rejects ORDER BY rejected_at DESC LIMIT 5",
    "SELECT user_id, team, environment, feature, provider, model, status, cost_usd, input_tokens, "
    "cache_read_tokens, cache_write_tokens FROM spend_records WHERE app_id = 'r' ORDER BY feature, user_id, provider, status",
    "SELECT count(), uniqExact(event_id) FROM spend_records WHERE startsWith(request_id, 'p')",
]


@pytest.mark.parametrize("query", SENT)
def test_what_the_suites_send_passes_the_guard(query):
    assert check_query(query, DB).kind == "select"


def test_json_values_are_exact():
    assert to_json_value(Decimal("0.000000000123")) == "0.000000000123"
    assert to_json_value(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00+00:00"
    assert to_json_value({"k": [Decimal("1.5")]}) == {"k": ["1.5"]}


def test_limits_ride_on_each_query():
    limits = QueryLimits(max_rows=10, max_seconds=5, max_memory_bytes=2**30, max_result_bytes=1000)
    assert limits.settings() == {
        "readonly": "1",
        "max_result_rows": "10",
        "max_result_bytes": "2000",  # ClickHouse's early stop; the bound is counted on the JSON
        "result_overflow_mode": "throw",
        "max_execution_time": "5",
        "max_memory_usage": str(2**30),
    }


def test_the_analyst_user_may_only_select_the_ledger():
    settings = Settings.model_validate(
        {
            "clickhouse_dsn": "http://ledger:ledger@clickhouse:8123",
            "clickhouse_analyst_password": SecretStr("pa'ss\\word"),
            "sql_max_rows": 100,
            "sql_max_seconds": 7,
            "sql_max_result_bytes": 4096,
        }
    )
    statements = analyst_statements(settings, PRIVATE_TABLES)
    assert statements == [
        "CREATE SETTINGS PROFILE IF NOT EXISTS `spendledger_analyst_profile`",
        "ALTER SETTINGS PROFILE `spendledger_analyst_profile` SETTINGS readonly = 1, max_execution_time = 7, "
        f"max_memory_usage = {512 * 1024**2}, max_result_rows = 100, max_result_bytes = 8192, "
        "result_overflow_mode = 'throw'",
        "CREATE USER IF NOT EXISTS `spendledger_analyst`",
        "ALTER USER `spendledger_analyst` IDENTIFIED WITH sha256_password BY 'pa\\'ss\\\\word' "
        "DEFAULT DATABASE `spend` SETTINGS PROFILE 'spendledger_analyst_profile'",
        "REVOKE ALL ON *.* FROM `spendledger_analyst`",
        "GRANT SELECT ON `spend`.* TO `spendledger_analyst`",
        "REVOKE SELECT ON `spend`.`api_keys` FROM `spendledger_analyst`",
    ]
