"""The package's layout, read from the source with ``ast``: the service never imports its
tooling (``pushsvc/tools``) nor psutil (the bench's extra), only ``pushsvc.__main__``
imports the command, and no pushsvc modules import each other in a cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pushsvc

PACKAGE = Path(pushsvc.__file__).resolve().parent
TOOLS = "pushsvc.tools"
SHELL = frozenset({"pushsvc.cli", "pushsvc.__main__"})  # starts the tools, lazily


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


SERVICE = sorted(name for name in MODULES if name not in SHELL and not _within(name, TOOLS))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """What an import statement of ``module`` imports, as absolute names: the modules, and
    for ``from x import y`` also ``x.y`` when that is a module of the package."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    yield base
    yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)


def every_import(module: str) -> Iterator[str]:
    """Everything ``module`` imports anywhere, inside functions too."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from _targets(module, node)


class _AtImport(ast.NodeVisitor):
    """The import statements that run when a module is imported: not those inside a
    function, nor under ``if TYPE_CHECKING:``."""

    def __init__(self) -> None:
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        pass  # runs when called

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        pass

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
        if name == "TYPE_CHECKING":
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)


def top_level_imports(module: str) -> Iterator[str]:
    visitor = _AtImport()
    visitor.visit(TREES[module])
    for node in visitor.found:
        yield from _targets(module, node)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start)):
            return found
    return None


def test_the_walk_sees_the_package() -> None:
    """The checks below would pass on nothing: make sure they read both sides."""
    assert {"pushsvc.api", "pushsvc.worker", "pushsvc.client", "pushsvc.guard"} <= set(SERVICE)
    tools = {"pushsvc.tools.procs", "pushsvc.tools.dev", "pushsvc.tools.bench.command"}
    assert tools <= set(MODULES)
    assert "pushsvc.tools.bench.command" in set(every_import("pushsvc.cli"))


def test_no_service_module_imports_the_tools_or_psutil() -> None:
    found = {
        f"{module} imports {target}"
        for module in SERVICE
        for target in every_import(module)
        if _within(target, TOOLS) or _within(target, "psutil")
    }
    assert not found, sorted(found)


def test_the_command_imports_the_tools_only_inside_its_commands() -> None:
    """``pushsvc api`` and ``pushsvc worker`` load no tooling."""
    eager = [t for t in top_level_imports("pushsvc.cli") if _within(t, TOOLS)]
    assert not eager


def test_nothing_imports_the_command() -> None:
    """The bug: ``bench.py`` imported ``cli.is_loopback`` while ``cli`` imports the bench
    (inside the command): a cycle, hidden only because one side was lazy. The command
    imports the library; nothing but ``python -m pushsvc`` imports the command."""
    found = {
        f"{module} imports {target}"
        for module in MODULES
        if module != "pushsvc.__main__"
        for target in every_import(module)
        if target == "pushsvc.cli"
    }
    assert not found, sorted(found)


def test_no_import_cycle() -> None:
    graph = {
        module: {t for t in top_level_imports(module) if t in MODULES and t != module}
        for module in MODULES
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
