"""The package's structure rules, checked on the source: no import cycles inside cure_lirpa (lazy
imports included, ``TYPE_CHECKING`` imports excluded), short functions (the CLI parses and calls one
library function), and the modules docs/architecture.md names exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cure_lirpa"
LIBRARY_LIMIT, LIBRARY_ALLOWED = 80, 2
CLI_LIMIT = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cure_lirpa modules ``name`` imports anywhere in its code (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and t != "cure_lirpa":
                out.add(t)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # packages' __init__ re-exports are edges from the package to its modules, not cycles
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_functions_are_short():
    long_library, long_cli = [], []
    for path in PACKAGE.rglob("*.py"):
        cli = path.parent.name == "cli"
        for name, length in _functions(path):
            where = f"{path.relative_to(ROOT)}:{name} ({length} lines)"
            if cli and length > CLI_LIMIT:
                long_cli.append(where)
            elif not cli and length > LIBRARY_LIMIT:
                long_library.append(where)
    assert not long_cli, f"CLI functions over {CLI_LIMIT} lines: {long_cli}"
    assert len(long_library) <= LIBRARY_ALLOWED, (
        f"more than {LIBRARY_ALLOWED} library functions over {LIBRARY_LIMIT} lines: {long_library}"
    )


def test_architecture_doc_names_existing_modules():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(cure_lirpa/[\w/]+(?:\.py)?)`", text))
    assert len(named) >= 15, "docs/architecture.md should name the package's modules"
    missing = [n for n in sorted(named) if not (ROOT / n).exists()]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(
        m for m in modules if m not in named and str(Path(m).parent) + "/" not in named
    )
    assert not unnamed, f"modules docs/architecture.md does not mention: {unnamed}"


def _string_literals(path: Path) -> list[tuple[str, int]]:
    """String constants of a module, docstrings excluded (name, line)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]  # fmt: skip


def test_names_are_spelled_in_the_vocabulary_only():
    """Each name of a norm, bound method, training objective (and its blocks and presets) or
    smoothing noise (and mode and training objective) appears as a string literal in
    cure_lirpa/vocabulary.py only (messages and help texts use the constants too)."""
    from cure_lirpa import vocabulary as v

    names = {*v.NORMS, *v.BOUND_METHODS, v.AUTO}
    names |= {*v.OBJECTIVES, *v.LINF_VARIANTS, *v.L2_VARIANTS, *v.PRESETS}
    names |= {*v.NOISES, *v.SMOOTHING_MODES, *v.SMOOTHING_OBJECTIVES}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "vocabulary.py":
            continue
        for value, line in _string_literals(path):
            if value in names:
                found.append(f"{path.relative_to(ROOT)}:{line} {value!r}")
    assert not found, f"{len(found)} literals outside vocabulary.py: {found[:30]}"
