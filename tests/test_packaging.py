"""A user's install carries what lmforge imports at run time, and nothing the tests alone need."""

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION_OF = {"yaml": "pyyaml", "sklearn": "scikit-learn", "faiss": "faiss-cpu", "PIL": "pillow"}
# imported directly, installed by the named runtime dependency (part of its public API)
PART_OF = {"starlette": "fastapi"}


def requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0].split("[")[0]
        for separator in "<>=!~ ":
            name = name.split(separator)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def distribution(module: str) -> str:
    top = module.split(".")[0]
    top = PART_OF.get(top, top)
    return DISTRIBUTION_OF.get(top, top).lower().replace("_", "-")


def third_party_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module, guarded by `except ImportError`, line) for each import of a package outside the standard library."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            catches = any(
                handler.type is not None and "ImportError" in ast.unparse(handler.type) for handler in node.handlers
            )
            for child in node.body:
                visit(child, guarded or catches)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            modules = []
        for module in modules:
            top = module.split(".")[0]
            if top != "lmforge" and top not in sys.stdlib_module_names and top != "__future__":
                found.append((module, guarded, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_test_only_packages_are_not_runtime_dependencies():
    runtime = requirement_names(PYPROJECT["project"]["dependencies"])
    for test_only in ("transformers", "accelerate", "lm-eval", "pytest", "playwright", "openai", "scikit-learn"):
        assert test_only not in runtime


def test_every_import_is_a_runtime_dependency_or_an_extra_behind_a_clear_error():
    runtime = requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional = set().union(*(requirement_names(extras[name]) for name in extras if name != "test"))
    problems = []
    for path in sorted((ROOT / "lmforge").rglob("*.py")):
        imports = third_party_imports(path)
        checked = {distribution(module) for module, guarded, _ in imports if guarded}  # a later import finds it there
        for module, guarded, line in imports:
            name = distribution(module)
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if name in runtime:
                continue
            if name not in optional:
                problems.append(f"{where}, which is neither a dependency nor an extra")
            elif not guarded and name not in checked:
                problems.append(f"{where} (the {name} extra) outside try/except ImportError")
    assert not problems, "\n".join(problems)


def test_the_test_extra_brings_every_other_extra_but_faiss():
    test = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert "lmforge[vision,parquet,eval]" in test
