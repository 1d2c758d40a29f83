"""The architecture as a checked rule (DESIGN §1): `core → storage → workers → searchsvc`, imports one way, no import
circle inside a package, no function over 60 lines. Read from the source (ast), so the check costs no imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "storage", "workers", "searchsvc")  # each may import only those before it
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the four packages."""
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: annotations only, never run."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(path: Path, known: dict[str, Path], runtime_only: bool) -> set[str]:
    """The project modules `path` imports (at module level or inside functions; `from a import b` counts
    `a.b` when that is a module)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree) if runtime_only else set()
    names = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_imports_run_one_way_down_the_layers():
    known = _modules()
    upward = []
    for module, path in known.items():
        allowed = LAYERS[: LAYERS.index(module.split(".")[0]) + 1]
        upward += [f"{module} imports {name}" for name in _imports(path, known, runtime_only=False)
                   if name.split(".")[0] not in allowed]
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None (depth-first search, white / grey / black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_anywhere():
    known = _modules()
    graph = {module: _imports(path, known, runtime_only=True) - {module} for module, path in known.items()}
    circle = _cycle(graph)
    assert circle is None, " → ".join(circle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_function_is_over_60_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
