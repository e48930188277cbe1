"""The import contract of docs/architecture.md: which layer may import which, read from the code's `ast`.

Layers, bottom to top: Formats (`schemas/`), Core (`ledger/`, pure: anything may use it), Platform
(settings, connections, errors), the services Ingest and Processors (siblings), Entry (CLI, embedded
system, supervisor). The Client (SDK, guard, plugins, fake LLM) stands apart: it imports Core and
Formats only, and of it the server uses the guard alone (the API answers `/v1/check` with the guard a
gateway embeds). An import inside `if TYPE_CHECKING:` does not run, so it does not count. `KNOWN`
lists the imports that break a rule, each with its reason: the list can only shrink.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGES = ("schemas", "ledger", "ingest", "processors", "spendledger")
CLIENT = ("spendledger.sdk", "spendledger.integrations", "spendledger.guard", "spendledger.fakellm")
ENTRY = ("spendledger.cli", "spendledger.services", "spendledger.embedded", "spendledger.supervisor",
         "spendledger.demo", "spendledger.restore", "spendledger.__main__")  # fmt: skip

MAY_IMPORT = {
    "Formats": {"Formats"},
    "Core": {"Core", "Formats"},
    "Platform": {"Platform", "Core", "Formats"},
    "Ingest": {"Ingest", "Platform", "Core", "Formats"},
    "Processors": {"Processors", "Platform", "Core", "Formats"},
    "Entry": {"Entry", "Ingest", "Processors", "Platform", "Core", "Formats", "Client"},
    "Client": {"Client", "Core", "Formats"},
}
SHARED_CLIENT = {"spendledger.guard"}  # of the Client, what Ingest may use too

# (importer, imported module) -> why it is still there. Fix one, then remove its line.
KNOWN: dict[tuple[str, str], str] = {}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "schemas":
        return "Formats"
    if top == "ledger":
        return "Core"
    if top in ("ingest", "processors"):
        return top.capitalize()
    if module.startswith("spendledger.platform"):
        return "Platform"
    if module.startswith(CLIENT):
        return "Client"
    if module.startswith(ENTRY) or module == "spendledger":
        return "Entry"
    raise AssertionError(f"{module} is in no layer: place it in one (docs/architecture.md)")


def package_of(module: str) -> str:
    """The folder a module is in (a package's `__init__` is the package itself)."""
    path = ROOT.joinpath(*module.split("."))
    return module if (path / "__init__.py").exists() else module.rpartition(".")[0]


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The project's modules `path` imports when it runs (a `from m import name` may name a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES and _exists(name)}


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def edges() -> set[tuple[str, str]]:
    return {
        (module_of(path), target)
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        for target in imported(path)
    }


def test_every_import_follows_the_layers_but_the_known_ones() -> None:
    broken = {
        (importer, target)
        for importer, target in edges()
        if layer(target) not in MAY_IMPORT[layer(importer)]
        and not (layer(importer) == "Ingest" and target in SHARED_CLIENT)
    }
    unexpected = sorted(broken - set(KNOWN))
    assert not unexpected, "\n".join(
        f"{importer} ({layer(importer)}) imports {target} ({layer(target)})"
        for importer, target in unexpected
    )
    gone = sorted(set(KNOWN) - broken)
    assert not gone, f"no longer imported: remove from KNOWN: {gone}"


def test_services_never_import_each_other_and_nothing_imports_the_entry_points() -> None:
    for importer, target in edges():
        assert {layer(importer), layer(target)} != {"Ingest", "Processors"}, (importer, target)
        if layer(target) == "Entry":
            assert layer(importer) == "Entry", (importer, target)


def test_no_package_imports_one_that_imports_it_back() -> None:
    """The folders form no cycle: what a folder imports never reaches back to it."""
    graph: dict[str, set[str]] = {}
    for importer, target in edges():
        source, dest = package_of(importer), package_of(target)
        if source != dest:
            graph.setdefault(source, set()).add(dest)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, set()))
    assert not cycles, f"packages in an import cycle: {cycles}"
    assert "spendledger.platform" in graph["ingest"] and "ingest" in graph["spendledger"]


def test_the_contract_sees_what_it_should() -> None:
    """The reader finds real imports, and a forbidden one would be caught."""
    found = edges()
    assert ("ingest.app", "ingest.budgets") in found and ("processors.sink", "schemas.records") in found
    assert not {"Platform", "Ingest", "Processors", "Entry"} & MAY_IMPORT["Client"]
    assert "Ingest" not in MAY_IMPORT["Processors"] and "Platform" not in MAY_IMPORT["Core"]
