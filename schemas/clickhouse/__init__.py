"""ClickHouse DDL, kept as `.sql` files and applied in file-name order."""

from __future__ import annotations

from importlib import resources


def split_statements(sql: str) -> list[str]:
    """Split a DDL file on `;` at end of line, dropping comment-only chunks."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current))
            current = []
    statements.append("\n".join(current))
    cleaned = []
    for statement in statements:
        code = "\n".join(ln for ln in statement.splitlines() if not ln.strip().startswith("--")).strip()
        if code:
            cleaned.append(code.rstrip(";").strip())
    return cleaned


def migrations() -> list[tuple[str, list[str]]]:
    """(file name, statements) for every DDL file, in order."""
    folder = resources.files(__name__)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, split_statements(f.read_text(encoding="utf-8"))) for f in files]


# Over `spend_records`: the keys a record's spend counts for in budgets (its tags, `model:` with the
# model's last path segment lower-cased, `provider:`), and the time it counts at (when the ledger
# received it). The SQL twins of `ledger.budgets.budget_keys` and `spend_time`, for the figures read
# back from ClickHouse (`/tag/info`'s `ledger_spend`, the restore); tests hold them equal.
BUDGET_KEYS_SQL = (
    "arrayConcat(tags, "
    "if(trimBoth(model) != '' AND NOT has(tags, 'model:' || lowerUTF8(arrayElement(splitByChar('/', trimBoth(model)), -1))), "
    "['model:' || lowerUTF8(arrayElement(splitByChar('/', trimBoth(model)), -1))], []), "
    "if(provider != '' AND NOT has(tags, 'provider:' || provider), ['provider:' || provider], []))"
)
SPEND_TIME_SQL = "received_at"
