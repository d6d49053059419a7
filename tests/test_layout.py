"""The package's shape: its import graph (read from the source, function-level imports included)
has no cycles, and the core modules build on nothing above them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lmforge"
# The core every part builds on; it imports nothing from the parts (training/, inference/, ...).
CORE = {"lmforge", "lmforge.errors", "lmforge.config", "lmforge.settings", "lmforge.tokenizer", "lmforge.model"}
CORE |= {"lmforge.atomic"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the lmforge modules it imports (`from lmforge.x import name` counts as lmforge.x.name
    where that is a module, else lmforge.x)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lmforge"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "lmforge":
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def depth(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports (modules on it, minus one) in an acyclic graph."""
    memo: dict[str, int] = {}

    def longest(node: str) -> int:
        if node not in memo:
            memo[node] = 1 + max((longest(target) for target in graph[node]), default=-1)
        return memo[node]

    return max(longest(node) for node in graph)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_finder_sees_a_cycle_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert depth({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == 2


def test_the_core_imports_nothing_above_it():
    graph = import_graph()
    upward = {module: sorted(graph[module] - CORE) for module in CORE if graph[module] - CORE}
    assert upward == {}


def test_only_the_command_line_imports_it():
    graph = import_graph()
    assert sorted(module for module, targets in graph.items() if "lmforge.cli" in targets) == ["lmforge.__main__"]
