"""The package's shape, checked from its source with `ast` (nothing is imported):

- no import circles among residtap's modules at module level;
- modules inside the package import each other directly, never through `residtap/__init__.py`;
- no file in residtap/ over MAX_LINES lines, except those ARCHITECTURE.md's section
  "Files over 400 lines" lists, each with its reason;
- only the engine (residtap/engine.py) and the hook plumbing below it (residtap/hooks.py)
  register PyTorch hooks: every feature plugs in through the engine's taps.

Module level means what runs when the module is imported: its body, including `if`/`try`
blocks and class bodies, but not `if TYPE_CHECKING:` blocks or function bodies. An import
inside a function runs later, so it cannot make an import circle; one that *would* close a
circle if it moved to module level is still a circle in the design, only deferred. Those must
be listed in DEFERRED (below, with the reason), so none is added unnoticed. Today: none.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "residtap"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
MAX_LINES = 400
ALLOW_LIST_HEADING = "## Files over 400 lines"

# Modules that may register PyTorch hooks themselves.
HOOK_OWNERS = {"residtap/engine.py", "residtap/hooks.py"}
HOOK_METHODS = {
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook",
    "register_module_forward_hook", "register_module_forward_pre_hook",
}  # fmt: skip

# Modules that may import the package itself (`import residtap`, `from residtap import x`):
# `python -m residtap` is the command line's entry point.
PACKAGE_IMPORTERS = {"residtap.__main__"}

# Function-level imports that would close an import circle at module level, as
# (importer, imported): reason. Empty: every such import has been removed.
DEFERRED: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------
# reading the package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


Where = Literal["module", "function", "typing"]


def _imports(body: list[ast.stmt], where: Where) -> Iterator[tuple[ast.stmt, Where]]:
    """(import statement, when it runs) for every import in `body`, however nested: "module"
    (on import), "function" (when a function is called), "typing" (never: `if TYPE_CHECKING:`)."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt, where
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _imports(stmt.body, "typing" if where == "typing" else "function")
        elif isinstance(stmt, ast.If):
            yield from _imports(stmt.body, "typing" if _is_type_checking(stmt.test) else where)
            yield from _imports(stmt.orelse, where)
        else:  # class bodies, try/except/else/finally, with, for, while, match: all run
            for field in ("body", "orelse", "finalbody"):
                yield from _imports(getattr(stmt, field, None) or [], where)
            for part in [*getattr(stmt, "handlers", ()), *getattr(stmt, "cases", ())]:
                yield from _imports(part.body, where)


def _targets(importer: str, stmt: ast.stmt) -> list[str]:
    """The residtap modules an import statement names: `from a import b` names the module a.b
    where that is a module, else a itself (b is then a name defined in a)."""
    if isinstance(stmt, ast.Import):
        return [alias.name for alias in stmt.names]
    assert isinstance(stmt, ast.ImportFrom)
    base = stmt.module or ""
    if stmt.level:  # relative: resolved against the importer's package
        package = importer.split(".")
        if MODULES[importer].name != "__init__.py":
            package.pop()
        package = package[: len(package) - (stmt.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in stmt.names]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) between residtap modules; imports under
    `if TYPE_CHECKING:` never run, so they are neither."""
    top: dict[str, set[str]] = {m: set() for m in MODULES}
    deferred: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for stmt, where in _imports(tree.body, "module"):
            for target in _targets(name, stmt):
                if target in MODULES and target != name and where != "typing":
                    (top if where == "module" else deferred)[name].add(target)
    return top, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic (depth-first)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def allow_list() -> dict[str, str]:
    """path -> reason, from the bullets "- `residtap/x.py` (N lines): reason" of the section
    ALLOW_LIST_HEADING of ARCHITECTURE.md (up to the next heading)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert ALLOW_LIST_HEADING in text, (
        f"ARCHITECTURE.md has no section {ALLOW_LIST_HEADING!r}; it lists the files allowed "
        "over the limit, and says why (an empty list is fine)"
    )
    section = re.split(r"^#{1,3} ", text.split(ALLOW_LIST_HEADING, 1)[1], flags=re.M)[0]
    entries = {}
    for line in section.splitlines():
        if m := re.match(r"^- `(residtap/[\w/]+\.py)`[^:]*:\s*(\S.*)$", line):
            entries[m[1]] = m[2]
    return entries


# ---------------------------------------------------------------------------------------------
# the checks


def test_the_reader_sees_imports_at_every_level():
    """The parser this file relies on: module-level, nested, relative and deferred imports."""
    source = (
        "from __future__ import annotations\nimport residtap.engine\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from residtap import sites\n"
        "try:\n    from . import positions\nexcept ImportError:\n    pass\n"
        "class A:\n    from residtap.store import reader\n"
        "def f():\n    from residtap.capture import capture\n"
    )
    found = [(t, where) for stmt, where in _imports(ast.parse(source).body, "module")
             for t in _targets("residtap.capture", stmt) if t.startswith("residtap")]
    assert found == [("residtap.engine", "module"), ("residtap.sites", "typing"),
                     ("residtap.positions", "module"), ("residtap.store.reader", "module"),
                     ("residtap.capture", "function")]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_at_module_level():
    top, _ = import_graph()
    assert len(top) > 50, f"found only {len(top)} modules under {PACKAGE}"
    cycle = find_cycle(top)
    assert cycle is None, (
        "import circle among residtap's modules: " + " -> ".join(cycle) + "; move the shared "
        "part into a module both can import, or import the lower one from the higher only"
    )


def test_deferred_imports_that_would_close_a_circle_are_listed():
    """An import moved into a function to dodge a circle is still a circle in the design."""
    top, deferred = import_graph()
    found = {(a, b) for a, targets in deferred.items() for b in targets
             if b not in top[a] and reaches(top, b, a)}
    unlisted = sorted(found - set(DEFERRED))
    assert not unlisted, (
        f"function-level imports that would close an import circle: {unlisted}; move what both "
        "modules need into a third module, or list the pair in DEFERRED with the reason"
    )
    stale = sorted(set(DEFERRED) - found)
    assert not stale, f"DEFERRED lists {stale}, which no longer close a circle; remove them"


def test_modules_import_each_other_not_the_package():
    """`import residtap` inside the package runs residtap/__init__.py, which imports every
    feature: a circle waiting to happen. Modules name the module that defines what they use."""
    offenders = []
    for name, path in MODULES.items():
        if name in PACKAGE_IMPORTERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for stmt, _ in _imports(tree.body, "module"):
            if "residtap" in _targets(name, stmt):
                offenders.append(f"{path.relative_to(ROOT)}:{stmt.lineno}")
    assert not offenders, (
        f"these import the package residtap itself: {offenders}; import from the module that "
        "defines the name instead (e.g. residtap.capture, residtap.version)"
    )


def test_no_file_over_the_line_limit_unless_architecture_says_why():
    allowed = allow_list()
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in MODULES.values()}
    missing = sorted(set(allowed) - set(sizes))
    assert not missing, f"ARCHITECTURE.md allows files that do not exist: {missing}"
    over = {p: n for p, n in sizes.items() if n > MAX_LINES and p not in allowed}
    assert not over, (
        f"files over {MAX_LINES} lines: {dict(sorted(over.items()))}; split them along their "
        f"seams, or list them under {ALLOW_LIST_HEADING!r} in ARCHITECTURE.md with the reason"
    )
    stale = sorted(p for p in allowed if sizes[p] <= MAX_LINES)
    assert not stale, f"ARCHITECTURE.md allows {stale}, now within {MAX_LINES} lines; drop them"


def test_only_the_engine_registers_hooks():
    offenders = []
    for path in MODULES.values():
        rel = str(path.relative_to(ROOT))
        if rel in HOOK_OWNERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            called = getattr(node, "attr", None) or getattr(node, "id", None)
            if called in HOOK_METHODS:
                offenders.append(f"{rel}:{node.lineno} {called}")
    assert not offenders, (
        f"hooks registered outside the engine: {offenders}; add a tap through residtap.engine "
        "(TapBlock; on_forward for per-forward work) so the engine owns and removes every hook"
    )


def test_the_hook_scan_would_see_a_hook():
    """The scan above is not vacuous: it finds the engine's own hooks."""
    source = (PACKAGE / "engine.py").read_text(encoding="utf-8")
    names = {getattr(n, "attr", None) for n in ast.walk(ast.parse(source))}
    assert names & HOOK_METHODS
