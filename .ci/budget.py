"""The complexity budget of CONTRIBUTING.md, checked: exit 1 and one line per breach.

- no function in the package over 60 lines (pure drawing code excepted, below), none with more
  than 7 parameters (`self`/`cls` not counted);
- no import cycle among the package's modules, counting imports inside functions too (a cycle
  there is still two modules that need each other); `TYPE_CHECKING` blocks are left out;
- no test reaching for a private name of the package (`from insect_exp.x import _y`, `x._y`).

`python .ci/budget.py --report` prints the figures (longest functions, parameter counts, cycles)
without failing.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "insect_exp"
MAX_LINES = 60
MAX_PARAMS = 7
# Pure drawing code: one long sequence of shapes reads better whole than cut into pieces.
DRAWING = ("insect_exp/data/demo.py::_draw_*", "insect_exp/data/demo.py::_shaded_ellipse")


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (bool(names) and names[0] in ("self", "cls"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, tree: ast.Module) -> set[str]:
    """The package modules `path` imports when it is imported itself."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in reachable(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] == "insect_exp"}


def reachable(body: list[ast.stmt]) -> list[ast.stmt]:
    """Every statement under `body`, function bodies included, `if TYPE_CHECKING:` left out."""
    statements: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            statements += reachable(node.orelse)
            continue
        statements.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, field, []):
                handler = isinstance(child, ast.ExceptHandler)
                statements += reachable(child.body if handler else [child])
    return statements


def part(module: str) -> str:
    """The package's part a module belongs to: `insect_exp.tracking.run` -> `insect_exp.tracking`.

    Cycles are counted between parts: a subpackage whose `__init__` loads its modules on first
    use hides a cycle between modules, not between the parts a reader has to hold in mind.
    """
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_breaches() -> tuple[list[str], list[tuple[int, str]]]:
    breaches: list[str] = []
    lengths: list[tuple[int, str]] = []
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module_name(path)] = module_imports(path, tree)
        rel = path.relative_to(ROOT).as_posix()
        for node in functions(tree):
            where = f"{rel}::{node.name}"
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            lengths.append((lines, where))
            drawing = any(fnmatch.fnmatch(where, pattern) for pattern in DRAWING)
            if lines > MAX_LINES and not drawing:
                breaches.append(f"{where}:{node.lineno}: {lines} lines (budget {MAX_LINES})")
            if parameters(node) > MAX_PARAMS and not drawing:
                breaches.append(
                    f"{where}:{node.lineno}: {parameters(node)} parameters (budget {MAX_PARAMS})"
                )
    edges: dict[str, set[str]] = {}
    for name, targets in graph.items():
        unit = part(name)
        edges.setdefault(unit, set()).update(part(t) for t in targets if part(t) != unit)
    breaches += [f"import cycle: {' <-> '.join(component)}" for component in cycles(edges)]
    return breaches, sorted(lengths, reverse=True)


def private_uses_in_tests() -> list[str]:
    found: list[str] = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package_aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("insect_exp")
            for alias in node.names
        } | {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.startswith("insect_exp")
        }
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("insect_exp"):
                private = [a.name for a in node.names if is_private(a.name)]
                private += [p for p in (node.module or "").split(".") if is_private(p)]
                found += [f"{rel}:{node.lineno}: imports {name}" for name in private]
            elif (
                isinstance(node, ast.Attribute)
                and is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in package_aliases
            ):
                found.append(f"{rel}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def main(argv: list[str]) -> int:
    breaches, lengths = package_breaches()
    breaches += private_uses_in_tests()
    if "--report" in argv:
        for lines, where in lengths[:10]:
            print(f"{lines:4d} lines  {where}")
    for line in breaches:
        print(line)
    return 1 if breaches and "--report" not in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
