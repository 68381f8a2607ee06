"""The shape of the code base, measured from its source: import graph, layers, private reaches.

Used by ``tests/test_architecture.py`` (the layers point one way) and by
``bench/bench_architecture.py`` (the figures the README quotes). Only the standard library: the
source is parsed with :mod:`ast`, nothing is imported.

The repository folders ``backends/`` and ``runtime/`` install as ``spherefmt.backends`` and
``spherefmt.runtime`` (see ``pyproject.toml``); module names here are the installed ones.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: repository folder -> installed package name
ROOTS = {"spherefmt": "spherefmt", "backends": "spherefmt.backends", "runtime": "spherefmt.runtime"}


@dataclass
class Import:
    """One import statement's target, as a module name of this code base."""

    target: str
    line: int
    lazy: bool  # inside a function or method
    typing_only: bool  # under ``if TYPE_CHECKING:``
    names: tuple[str, ...] = ()


@dataclass
class Module:
    name: str
    path: Path
    rel: str  # the path relative to the repository
    lines: int
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def modules(repo: Path = REPO) -> dict[str, Module]:
    """Every Python module of the library (not tests, not bench), keyed by installed name."""
    out: dict[str, Module] = {}
    for folder, package in ROOTS.items():
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if folder == "spherefmt" and parts[:1] in (["backends"], ["runtime"]):
                continue  # never present in the source tree; kept out for safety
            src = path.read_text()
            out[name] = Module(name, path, str(path.relative_to(repo)), src.count("\n"), ast.parse(src, str(path)))
    for mod in out.values():
        mod.imports = list(_imports(mod, out))
    return out


def _resolve(mod: Module, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(mod: Module, known: dict[str, Module]) -> Iterator[Import]:
    def walk(node: ast.AST, lazy: bool, typing_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    yield from walk_one(sub, lazy, True)
                for sub in child.orelse:
                    yield from walk_one(sub, lazy, typing_only)
                continue
            yield from walk_one(child, lazy, typing_only)

    def walk_one(child: ast.AST, lazy: bool, typing_only: bool) -> Iterator[Import]:
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == "spherefmt":
                    yield Import(_known(alias.name, known), child.lineno, lazy, typing_only)
        elif isinstance(child, ast.ImportFrom):
            base = _resolve(mod, child.level, child.module)
            if base.split(".")[0] != "spherefmt":
                return
            names = tuple(a.name for a in child.names)
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if subs and len(subs) == len(names):
                for s in subs:
                    yield Import(s, child.lineno, lazy, typing_only, names)
            else:
                yield Import(_known(base, known), child.lineno, lazy, typing_only, names)
                for s in subs:
                    yield Import(s, child.lineno, lazy, typing_only, names)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from walk(child, True, typing_only)
        else:
            yield from walk(child, lazy, typing_only)

    yield from walk(mod.tree, False, False)


def _known(name: str, known: dict[str, Module]) -> str:
    # ``import spherefmt.a.b`` also imports the packages above it; the edge that matters is the
    # deepest module that exists.
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph(mods: dict[str, Module], *, typing: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports at run time (top level and lazy; typing-only if asked)."""
    return {m.name: {i.target for i in m.imports if i.target != m.name and (typing or not i.typing_only)}
            for m in mods.values()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


@dataclass(frozen=True)
class Reach:
    module: str
    line: int
    name: str


def private_reaches(mods: dict[str, Module]) -> list[Reach]:
    """Uses of another module's underscore names: ``obj._x`` where ``_x`` is not defined in the
    module that uses it, and ``from m import _x``. Dunders and ``self``/``cls`` access are fine."""
    out: list[Reach] = []
    for mod in mods.values():
        own = _defined_names(mod.tree)
        foreign = _foreign_names(mod.tree)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                v = node.value
                if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in foreign):
                    continue  # own members, or another library's (os._exit)
                out.append(Reach(mod.name, node.lineno, node.attr))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node.level, node.module)
                if base.split(".")[0] == "spherefmt":
                    out += [Reach(mod.name, node.lineno, a.name) for a in node.names if _private(a.name)]
    return out


def _foreign_names(tree: ast.Module) -> set[str]:
    """Names bound by importing modules that are not spherefmt's."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("spherefmt")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("spherefmt"):
            out |= {a.asname or a.name for a in node.names}
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_of(name: str) -> str:
    """The layer a module belongs to (see :data:`ALLOWED`)."""
    for prefix, layer in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return "top"


#: module prefix -> layer, most specific first
LAYERS: list[tuple[str, str]] = [
    ("spherefmt.errors", "ground"),
    ("spherefmt.constants", "ground"),
    ("spherefmt.units", "ground"),
    ("spherefmt.dtypes", "ground"),
    ("spherefmt.progress", "ground"),
    ("spherefmt.heap", "ground"),
    ("spherefmt.backends", "backends"),
    ("spherefmt.runtime", "runtime"),
    ("spherefmt.format", "format"),
    ("spherefmt.containers", "format"),
    ("spherefmt.interop", "format"),
    ("spherefmt.training", "top"),
    ("spherefmt.testing", "top"),
    ("spherefmt", "top"),
]

#: layer -> the layers it may import (its own included)
ALLOWED: dict[str, set[str]] = {
    "ground": {"ground"},
    "format": {"ground", "format"},
    "backends": {"ground", "backends"},
    "runtime": {"ground", "format", "backends", "runtime"},
    "top": {"ground", "format", "backends", "runtime", "top"},
}


def violations(mods: dict[str, Module]) -> list[str]:
    """Every import (top level, lazy and typing-only) that points against the layers."""
    out = []
    for mod in mods.values():
        src = layer_of(mod.name)
        for imp in mod.imports:
            dst = layer_of(imp.target)
            if dst not in ALLOWED[src]:
                out.append(f"{mod.rel}:{imp.line}: {mod.name} ({src}) imports "
                           f"{imp.target} ({dst})")
    return out


def report(repo: Path = REPO) -> dict[str, object]:
    """The figures of the architecture issue: sizes, reaches, cycles, lazy imports."""
    mods = modules(repo)
    g = graph(mods)
    lazy = [(m.name, i.line, i.target) for m in mods.values() for i in m.imports if i.lazy]
    biggest = sorted(mods.values(), key=lambda m: -m.lines)[:10]
    return {
        "modules": len(mods),
        "lines": sum(m.lines for m in mods.values()),
        "largest": {m.name: m.lines for m in biggest},
        "private_reaches": len(private_reaches(mods)),
        "cycles": cycles(g),
        "imports_internal": sum(len(m.imports) for m in mods.values()),
        "imports_lazy": len(lazy),
        "lazy": [f"{n}:{line} -> {t}" for n, line, t in lazy],
        "layer_violations": violations(mods),
    }
