"""Print the import graph of the ``oni_sys`` package, and check its layering.

How to run:   .venv/bin/python docs/import_graph.py [--modules] [--check]
Results:      one line per package (``contracts``, ``envs``, ``models``, ``actors``, ...) with the
              packages it imports, imports inside functions included; ``--modules`` lists
              modules instead. ``--check`` exits 1 naming every import that breaks the layers
              below, and every import cycle between modules.

Layers, lowest first: a package may import its own layer and the layers below it, never above.
Ray is imported in ``runtime`` only.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "oni_sys"

#: lowest first; a package may import only packages of its own layer or lower ones
LAYERS: list[set[str]] = [
    {"contracts", "atomic_io"},
    {"envs"},
    {"config"},  # validates env specs and captioners against envs
    {"models"},
    {"actors", "learners", "annotators"},
    {"runtime", "reward_report", "evaluate", "doctor"},
    {"cli", "__init__"},
]
#: imports a layer may make of a higher one, each with its reason
ALLOWED_UP = {
    # the run directory's checkpoint reader (oni-sys eval loads a run's latest checkpoint)
    ("evaluate", "runtime"),
    # doctor's Ray check lives with the runtime that owns Ray
    ("doctor", "runtime"),
}


def module_name(path: Path) -> str:
    """``oni_sys/envs/spec.py`` -> ``oni_sys.envs.spec``."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def package_of(module: str) -> str:
    """The top-level part below ``oni_sys`` (``oni_sys.envs.spec`` -> ``envs``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str) -> list[tuple[str, int]]:
    """Every module a source file imports (anywhere in it, inside functions too), with its
    line; ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (
                callee in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                found.append((arg.value, node.lineno))
    return sorted(found, key=lambda item: item[1])


def graph() -> dict[str, dict[str, int]]:
    """Module -> {imported oni_sys module or external top-level name (``ray``): first line}."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        edges: dict[str, int] = {}
        for name, line in imports_of(path.read_text(encoding="utf-8")):
            key = name if name.startswith("oni_sys") else name.split(".")[0]
            edges.setdefault(key, line)
        out[module_name(path)] = edges
    return out


def layer(package: str) -> int:
    for i, members in enumerate(LAYERS):
        if package in members:
            return i
    raise KeyError(f"package {package!r} is in no layer of docs/import_graph.py")


def problems(g: dict[str, dict[str, int]]) -> list[str]:
    """Layer violations, Ray outside the runtime, and module cycles."""
    found = []
    for module, edges in g.items():
        src = package_of(module)
        for target, line in edges.items():
            where = f"{module} (line {line})"
            if target == "ray" and src != "runtime":
                found.append(f"{where} imports ray; only oni_sys.runtime may")
            if not target.startswith("oni_sys."):
                continue
            dst = package_of(target)
            if layer(dst) > layer(src) and (src, dst) not in ALLOWED_UP:
                found.append(f"{where} imports {target}: {src} is below {dst}")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(g)]
    return found


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Import cycles between modules (one per strongly connected component)."""
    nodes = {m: [t for t in e if t in g and t != m] for m, e in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in nodes[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="one line per module")
    parser.add_argument("--check", action="store_true", help="exit 1 on a layering problem")
    args = parser.parse_args()
    g = graph()
    if args.modules:
        for module, edges in g.items():
            internal = sorted(t for t in edges if t.startswith("oni_sys"))
            print(f"{module} -> {', '.join(internal) or '-'}")
    else:
        packages: dict[str, set[str]] = defaultdict(set)
        for module, edges in g.items():
            src = package_of(module)
            packages[src]  # noqa: B018 (every package gets a line)
            for target in edges:
                if target.startswith("oni_sys.") and package_of(target) != src:
                    packages[src].add(package_of(target))
        for src in sorted(packages, key=lambda p: (layer(p), p)):
            print(f"{src:14} -> {', '.join(sorted(packages[src])) or '-'}")
    if args.check:
        found = problems(g)
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
