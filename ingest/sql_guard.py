"""What `/v1/sql` may run: one SELECT over the ledger's own tables, checked on a parsed tree.

The caller's text is never run. It is read with sqlglot's ClickHouse dialect, every function call
kept under the name ClickHouse knows it by, and must be:
- ONE statement (a `;` may only end it);
- a SELECT, with WITH, UNION / INTERSECT / EXCEPT, subqueries, joins, ARRAY JOIN, window functions
  and lambdas; or one of two fixed forms this module renders itself: `SHOW TABLES` (the ledger's)
  and `DESCRIBE [TABLE] <ledger table>`;
- made only of constructs on an allow-list (one this module does not know is refused, never
  guessed at), calling only the functions of `sql_functions.txt` (aggregates with combinators);
- reading only the ledger database's tables (unqualified, or qualified with its name), never
  `PRIVATE_TABLES`, never a table function (file(), url(), merge(), numbers()…: a series is
  `arrayJoin(range(n))`);
- free of SETTINGS, FORMAT, INTO OUTFILE and query parameters: the API sets the limits and the format.

The tree is then rendered back to text, without comments, and that text must read back to itself:
that text is what runs. ClickHouse's own parser confirms it (`check_explained`, on `EXPLAIN AST` of the
rendered text) before it runs with readonly=1 and the limits, in server mode as a ClickHouse user
that may only SELECT the ledger's database.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Literal

from sqlglot import exp
from sqlglot.dialects.clickhouse import ClickHouse
from sqlglot.errors import ParseError, TokenError
from sqlglot.parsers.clickhouse import ClickHouseParser
from sqlglot.tokens import Token, TokenType

from ingest.errors import InvalidQuery

# Tables of the ledger database that are not analysts' to read.
PRIVATE_TABLES = frozenset({"api_keys"})
COMBINATORS = (
    "SimpleState", "MergeState", "OrDefault", "Distinct", "Resample", "ForEach", "ArgMax", "ArgMin",
    "OrNull", "Tuple", "Merge", "State", "Array", "Null", "Map", "If",
)  # fmt: skip
# ClickHouse reads `x IN db.t` (and these functions' second argument) as a table.
IN_FUNCTIONS = frozenset(
    f.lower()
    for f in (
        "in", "notIn", "globalIn", "globalNotIn", "nullIn", "notNullIn", "globalNullIn",
        "globalNotNullIn", "inIgnoreSet", "notInIgnoreSet", "globalInIgnoreSet", "globalNotInIgnoreSet",
    )
)  # fmt: skip
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HELP = "one SELECT over the ledger's tables (WITH, UNION, subqueries and joins are fine), SHOW TABLES or DESCRIBE <table>"


@dataclass(frozen=True)
class Statement:
    """What runs: text rendered here, never the caller's."""

    sql: str
    kind: Literal["select", "tables", "describe"]


class _Verbatim(ClickHouse):
    """ClickHouse as sqlglot reads it, each function call kept as written (name and arguments), so the
    rendered text calls what the caller called and the allow-list sees ClickHouse's own names."""

    class Parser(ClickHouseParser):
        FUNCTIONS: ClassVar[dict[str, Any]] = {}
        # Only the call syntaxes that are not `name(arg, …)`: CAST(x AS T), EXTRACT(… FROM …),
        # TRIM(BOTH … FROM …), SUBSTRING(… FROM … FOR …), POSITION(… IN …), COLUMNS('re').
        FUNCTION_PARSERS: ClassVar[dict[str, Any]] = {
            k: v
            for k, v in ClickHouseParser.FUNCTION_PARSERS.items()
            if k in {"CAST", "EXTRACT", "TRIM", "SUBSTRING", "POSITION", "COLUMNS"}
        }
        NO_PAREN_FUNCTION_PARSERS: ClassVar[dict[str, Any]] = {
            k: v for k, v in ClickHouseParser.NO_PAREN_FUNCTION_PARSERS.items() if k == "CASE"
        }
        NO_PAREN_FUNCTIONS: ClassVar[dict[Any, Any]] = {}


_DIALECT = _Verbatim()

# Calls checked by name against the function list.
_CALLS = (
    exp.Anonymous,
    exp.AnonymousAggFunc,
    exp.CombinedAggFunc,
    exp.ParameterizedAgg,
    exp.CombinedParameterizedAgg,
)
# Every other kind of node a SELECT may hold. Var (a bare word) only where it is a unit or a type.
_NODES = frozenset(
    getattr(exp, name)
    for name in """
    Select Union Intersect Except Subquery With CTE From Join Where PreWhere Group Having Qualify Order
    Ordered Limit Offset Distinct Final TableSample Table TableAlias WithFill Rollup Cube GroupingSets
    Window WindowSpec Tuple Column Identifier Star Dot Alias Literal Null Boolean HexString BitString
    Paren Array Bracket Lambda Case If Interval DataType DataTypeParam Cast CastToStrType Extract Trim
    Substring StrPosition Filter RespectNulls IgnoreNulls Exists Not Neg And Or Xor EQ NEQ NullSafeEQ
    NullSafeNEQ GT GTE LT LTE Add Sub Mul Div Mod DPipe Like ILike In Between Is Columns Var
    """.split()
)
_VAR_PARENTS = (exp.Extract, exp.Interval, exp.DataType, exp.DataTypeParam, exp.WindowSpec)
# The kinds of node ClickHouse's AST of such a SELECT holds (EXPLAIN AST). Not APPLY's transformer:
# the AST does not show what it calls.
_AST_KINDS = frozenset(
    """
    SelectWithUnionQuery SelectIntersectExceptQuery SelectQuery ExpressionList Subquery WithElement
    TablesInSelectQuery TablesInSelectQueryElement TableExpression TableIdentifier TableJoin ArrayJoin
    SampleRatio Function Identifier Literal Asterisk QualifiedAsterisk ColumnsRegexpMatcher
    ColumnsListMatcher QualifiedColumnsRegexpMatcher QualifiedColumnsListMatcher ColumnsTransformerList
    ColumnsExceptTransformer ColumnsReplaceTransformer ColumnsReplaceTransformer::Replacement
    OrderByElement InterpolateElement WindowDefinition WindowListElement
    """.split()
)


def check_query(sql: str, database: str) -> Statement:
    """The statement to run for `sql`, or InvalidQuery saying what is refused and why."""
    try:
        return _check(sql, database)
    except RecursionError as exc:
        raise InvalidQuery("the query is nested too deeply") from exc


def _check(sql: str, database: str) -> Statement:
    tokens = _tokens(sql)
    head = tokens[0].text.upper()
    if head in ("SHOW", "DESCRIBE", "DESC"):
        return _fixed_form(tokens, database)
    if head not in ("SELECT", "WITH", "("):
        raise InvalidQuery(
            f"only read-only queries are allowed: {_HELP}; got {head}", {"refused": "statement", "name": head}
        )
    try:
        trees = _DIALECT.parser().parse(tokens, sql)
    except ParseError as exc:
        raise InvalidQuery(f"the query cannot be read as ClickHouse SQL: {_parse_problem(exc)}") from exc
    tree = trees[0] if len(trees) == 1 else None
    if not isinstance(tree, exp.Query):
        raise InvalidQuery(f"only read-only queries are allowed: {_HELP}", {"refused": "statement"})
    for node in tree.walk():
        _check_node(node, database)
    rendered = _render(tree)
    try:
        again = [_render(t) for t in _DIALECT.parse(rendered) if t is not None]
    except (ParseError, TokenError):
        again = []
    if again != [rendered]:  # what runs must read back as itself
        raise InvalidQuery("the query uses syntax this API cannot pass on faithfully; write it more plainly")
    return Statement(rendered, "select")


def function_allowed(name: str) -> bool:
    """Whether `name` is on the list, directly or as an aggregate with combinators (`sumIf`, `uniqMergeState`)."""
    lowered = name.lower()
    scalar, aggregate = listed_functions()
    if lowered in scalar or lowered in aggregate:
        return True
    stripped = True
    while stripped:
        stripped = False
        for combinator in COMBINATORS:
            suffix = combinator.lower()
            if lowered.endswith(suffix) and len(lowered) > len(suffix):
                lowered = lowered[: -len(suffix)]
                if lowered in aggregate:
                    return True
                stripped = True
                break
    return False


def check_explained(lines: Sequence[str], database: str) -> None:
    """The same rules, on ClickHouse's own reading of a rendered statement (`EXPLAIN AST`: one node a
    line, indented by depth): functions on the list, no table function, tables of `database` only."""
    path: list[list[Any]] = []  # [kind, name, children seen] of the current line's ancestors
    for number, line in enumerate(lines):
        depth = len(line) - len(line.lstrip(" "))
        kind, _, rest = line.strip().partition(" ")
        name = re.sub(r"( \(alias .*\))?( \(children \d+\))?$", "", rest)
        del path[depth:]
        index = path[-1][2] if path else 0
        if path:
            path[-1][2] += 1
        last = number == len(lines) - 1
        if (depth == 0 and kind != "SelectWithUnionQuery") or (
            depth == 1
            and kind != "ExpressionList"
            and not (kind == "Identifier" and last)  # the client's FORMAT
        ):
            raise InvalidQuery(f"ClickHouse reads more than one SELECT into the query ({line.strip()})")
        parent = path[-1][0] if path else ""
        call = path[-2] if len(path) > 1 and parent == "ExpressionList" else None
        if kind not in _AST_KINDS:
            raise InvalidQuery(
                f"ClickHouse reads a construct into the query that this API does not pass on: {kind}"
            )
        if kind == "Function" and parent == "TableExpression":
            _refuse_table_function(name)
        elif kind == "Function" and not function_allowed(name):
            _refuse_function(name)
        elif kind == "TableIdentifier":
            _check_table(name.split("."), database)
        elif kind == "Identifier" and name.count(".") >= 2:
            _check_table(name.split(".")[:2], database)
        elif (
            kind == "Identifier"
            and call
            and call[0] == "Function"
            and call[1].lower() in IN_FUNCTIONS
            and index
        ):
            _check_table(name.split("."), database)  # `x IN db.t`: a table
        path.append([kind, name, 0])


def _tokens(sql: str) -> list[Token]:
    try:
        tokens = _DIALECT.tokenize(sql)
    except TokenError as exc:
        raise InvalidQuery(f"the query cannot be read as ClickHouse SQL: {exc}") from exc
    while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
        tokens.pop()
    if not tokens:
        raise InvalidQuery("the query is empty")
    if any(t.token_type == TokenType.SEMICOLON for t in tokens):
        raise InvalidQuery("only one statement is allowed; remove the ';' and what follows it")
    for before, after in zip(tokens, tokens[1:], strict=False):
        if before.token_type == TokenType.INTO and after.text.upper() == "OUTFILE":
            raise InvalidQuery(
                "INTO OUTFILE is not allowed: the API returns the rows", {"refused": "into outfile"}
            )
    return tokens


def _fixed_form(tokens: list[Token], database: str) -> Statement:
    words = [t.text for t in tokens]
    if [w.upper() for w in words] == ["SHOW", "TABLES"]:
        return Statement(f"SHOW TABLES FROM `{database}`", "tables")
    if words[0].upper() in ("DESCRIBE", "DESC"):
        rest = words[2:] if len(words) > 1 and words[1].upper() == "TABLE" else words[1:]
        if len(rest) == 3 and rest[1] == "." and rest[0] == database:
            rest = rest[2:]
        if len(rest) == 1 and _NAME.match(rest[0]):
            _check_table([rest[0]], database)
            return Statement(f"DESCRIBE TABLE `{database}`.`{rest[0]}`", "describe")
    raise InvalidQuery(
        "besides SELECT only `SHOW TABLES` and `DESCRIBE <table>` are supported, for the ledger's tables; "
        "for more, SELECT from the ledger's tables",
        {"refused": "statement", "name": words[0].upper()},
    )


def _check_node(node: exp.Expr, database: str) -> None:
    if isinstance(node, exp.Query) and (node.args.get("settings") or node.args.get("format")):
        clause = "SETTINGS" if node.args.get("settings") else "FORMAT"
        raise InvalidQuery(
            f"{clause} is chosen by the API (limits and JSON); remove the {clause} clause",
            {"refused": clause},
        )
    if isinstance(node, exp.Select) and node.args.get("kind"):
        _refuse_construct(node)
    if isinstance(node, exp.Table):
        _check_table_node(node, database)
    elif isinstance(node, exp.Column):
        if node.args.get("catalog") or node.args.get("db") and node.args["db"].name != database:
            raise _other_database((node.args.get("catalog") or node.args["db"]).name)
    elif isinstance(node, exp.In):  # `x IN db.t` / `x IN (db.t)`: a table
        field = node.args.get("field") or (node.expressions[0] if len(node.expressions) == 1 else None)
        _check_table_operand(field, database)
    elif isinstance(node, (exp.Placeholder, exp.Parameter)):
        raise InvalidQuery(
            "query parameters ({name:Type}, ?) are not supported; write the values into the query"
        )
    elif isinstance(node, exp.RawString):
        raise InvalidQuery("heredoc strings ($$…$$) are not supported; write '…' (with '' for a quote)")
    elif isinstance(node, exp.Identifier):
        if any(c in node.name for c in '"`\\') or any(ord(c) < 32 for c in node.name):
            raise InvalidQuery(
                f"names with quotes, backslashes or control characters are not allowed: {node.name!r}"
            )
    if isinstance(node, _CALLS):
        if not function_allowed(node.name):
            _refuse_function(node.name)
        if node.name.lower() in IN_FUNCTIONS and len(node.expressions) > 1:
            _check_table_operand(node.expressions[1], database)
    elif type(node) not in _NODES or isinstance(node, exp.Var) and not isinstance(node.parent, _VAR_PARENTS):
        _refuse_construct(node)


def _check_table_operand(node: exp.Expr | None, database: str) -> None:
    """IN's right side: ClickHouse reads a bare (or parenthesised) name there as a table."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Column):
        _check_table([p.name for p in node.parts], database)


def _check_table_node(table: exp.Table, database: str) -> None:
    if isinstance(table.this, exp.Func):
        _refuse_table_function(table.this.name)
    if not isinstance(table.this, exp.Identifier):
        _refuse_construct(table)
    if table.args.get("catalog"):
        raise _other_database(table.args["catalog"].name)
    _check_table([p.name for p in (table.args.get("db"), table.this) if p is not None], database)


def _check_table(parts: list[str], database: str) -> None:
    """`[table]` or `[database, table]`: the ledger database's, and not private."""
    if len(parts) > 2 or len(parts) == 2 and parts[0] != database:
        raise _other_database(parts[0])
    if parts[-1] in PRIVATE_TABLES:
        raise InvalidQuery(
            f"the table {parts[-1]!r} is not readable through SQL", {"refused": "table", "name": parts[-1]}
        )


def _other_database(name: str) -> InvalidQuery:
    return InvalidQuery(
        f"only the ledger's own tables can be read; the query names the database {name!r}",
        {"refused": "database", "name": name},
    )


def _refuse_function(name: str) -> None:
    raise InvalidQuery(
        f"the function {name}() is not allowed: SQL here is readonly and reads the ledger's tables only "
        "(no files, URLs, settings, other tables or server state)",
        {"refused": "function", "name": name},
    )


def _refuse_table_function(name: str) -> None:
    raise InvalidQuery(
        f"table functions such as {name}() are not allowed: SQL here is readonly and reads the ledger's "
        "tables only (for a series of numbers use arrayJoin(range(n)))",
        {"refused": "table function", "name": name},
    )


def _refuse_construct(node: exp.Expr) -> None:
    text = _render(node)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise InvalidQuery(f"{text!r} is not supported here: {_HELP}", {"refused": "construct", "name": text})


def _render(node: exp.Expr) -> str:
    return _DIALECT.generate(node, comments=False)


def _parse_problem(exc: ParseError) -> str:
    if not exc.errors:
        return str(exc).splitlines()[0]
    first = exc.errors[0]
    near = f"{first.get('highlight') or ''}{first.get('end_context') or ''}".strip()[:40]
    where = f" at line {first.get('line')}, column {first.get('col')}"
    return f"{first.get('description')}{where}" + (f", near {near!r}" if near else "")


@functools.cache
def listed_functions() -> tuple[frozenset[str], frozenset[str]]:
    """(scalar, aggregate) lower-cased names from sql_functions.txt."""
    scalar: set[str] = set()
    aggregate: set[str] = set()
    heading = ""
    for line in (
        resources.files("ingest").joinpath("sql_functions.txt").read_text(encoding="utf-8").splitlines()
    ):
        if line.startswith("#"):
            heading = line
            continue
        (aggregate if heading.startswith("# Aggregate") else scalar).update(n.lower() for n in line.split())
    return frozenset(scalar), frozenset(aggregate)
