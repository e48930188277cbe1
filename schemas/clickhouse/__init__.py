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
